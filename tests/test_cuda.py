"""CUDA backend against the float64 reference (skipped without a GPU; run on the GPU machine)."""
import random

import pytest
import torch

import libortho
from libortho import OrthoConfig, OrthoLinear, quant
from libortho.ops import cuda as cuda_backend
from libortho.sieve import sieve

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_backend.build(verbose=False), f"CUDA extension failed to build: {cuda_backend._state['error']}"


@pytest.fixture(params=cuda_backend.DECODE_KERNELS)
def variant(request):
    """Every test taking this fixture runs once per small-M kernel variant (v1, v2, v3)."""
    cuda_backend.set_decode_kernel(request.param)
    yield request.param
    cuda_backend.set_decode_kernel(None)


def poison_allocator():
    """Fill freed cached blocks with NaN so an unwritten output element shows up as NaN."""
    junk = torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    del junk


def make_layer(n, k, bits, gs, sym, density, dtype, gen, bias=True, csr=None):
    w = torch.randn(n, k, generator=gen, device="cuda") * (torch.rand(n, 1, generator=gen, device="cuda") + 0.1)
    codes, grid = quant.quantize(w, bits, gs, sym, scale_dtype=dtype)
    if csr is None and density > 0:
        csr = sieve(w - quant.dequantize(codes, grid), density, "magnitude", value_dtype=dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype) if bias else None
    return OrthoLinear.pack(codes, grid, csr, b, dtype)


def run_config(ext, layer, x, cfg, alpha, bias=None):
    """One call of v1 configuration cfg on poisoned memory: (its output, the lean launches it counted)."""
    n, k = layer.out_features, layer.in_features
    poison_allocator()
    before = ext.v1_lean_launches()
    y = cuda_backend._checked(ext.fused_small_m_cfg(
        x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, bias, alpha, 4,
        quant.effective_group_size(layer.group_size, k), n, k, cfg), f"config {cfg}")
    return y, ext.v1_lean_launches() - before


def with_counted_calls(monkeypatch, ext, fn):
    """fn() with the extension wrapped so that the dispatch's calls of its entry points are recorded, in order:
    (fn's result, the entry points' names)."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*a):
                calls.append(name)
                return getattr(ext, name)(*a)
            return call

    monkeypatch.setitem(cuda_backend._state, "ext", Spy())
    try:
        return fn(), calls
    finally:
        monkeypatch.setitem(cuda_backend._state, "ext", ext)


def reference64(layer, x, alpha):
    w = layer.base_weight().double()
    if alpha != 0 and layer.ortho_nnz:
        w = w + alpha * layer.ortho().to_dense().double()
    y = x.double() @ w.t()
    return y + layer.bias.double() if layer.bias is not None else y


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned elements)"
    return float((y.double() - ref).norm() / ref.norm())


SHAPES = [(16, 64), (37, 200), (192, 576), (576, 576), (1536, 576), (576, 1536), (100, 1000), (4096, 4096),
          (11008, 4096), (4096, 11008), (1, 128), (48, 90), (300, 4100)]
MS = [1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64, 65, 200, 1024]


def _cases(count=160, seed=0):
    r = random.Random(seed)
    out = []
    for _ in range(count):
        out.append((r.choice(SHAPES), r.choice(MS), r.choice([2, 3, 4, 4, 8]), r.choice([32, 64, 128, 128, -1]),
                    r.choice([True, False]), r.choice([0.0, 0.005, 0.01, 0.05]), r.choice([0.0, 0.5, 1.0]),
                    r.choice([torch.bfloat16, torch.float16])))
    return out


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_matches_float64_reference(case, variant):
    (n, k), m, bits, gs, sym, density, alpha, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)
    layer = make_layer(n, k, bits, gs, sym, density, dtype, gen)
    layer.alpha = alpha
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    poison_allocator()
    y = layer(x)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, reference64(layer, x, alpha)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_empty_rows_and_one_very_dense_row(m, dtype, variant):
    n, k = 200, 576
    gen = torch.Generator(device="cuda").manual_seed(m)
    dense = torch.zeros(n, k, device="cuda")
    dense[7] = torch.randn(k, generator=gen, device="cuda")            # a full row
    dense[150, ::3] = torch.randn(192, generator=gen, device="cuda")   # a dense-ish row; the rest empty
    idx = torch.nonzero(dense.reshape(-1)).reshape(-1)
    from libortho.sieve import csr_from_indices
    csr = csr_from_indices(dense, idx, dtype)
    layer = make_layer(n, k, 4, 128, True, 0.0, dtype, gen, csr=csr)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    for alpha in (0.0, 0.5, 1.0):
        layer.alpha = alpha
        poison_allocator()
        assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[dtype]


@pytest.mark.parametrize("n,m,gs,sym,dtype", [(11008, 1, 128, False, torch.bfloat16), (6353, 5, 32, True, torch.float16),
                                               (14336, 8, -1, False, torch.bfloat16), (8000, 3, 64, False, torch.float16)])
def test_tall_grid_configuration(n, m, gs, sym, dtype):
    """INT4 at M <= 8 with >= 3 blocks per SM runs v1's tall-grid configuration (v1.cu, v1_class)."""
    gen = torch.Generator(device="cuda").manual_seed(n + m)
    layer = make_layer(n, 1000, 4, gs, sym, 0.02, dtype, gen)
    x = torch.randn(m, 1000, generator=gen, device="cuda").to(dtype)
    for alpha in (0.0, 0.5, 1.0):
        layer.alpha = alpha
        poison_allocator()
        assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[dtype]


V1_CONFIG_MAX_M = cuda_backend.V1_CONFIG_MAX_M  # per v1_configs.cu fused_cfg_dispatch index
V1_CONFIGS = len(V1_CONFIG_MAX_M)  # (benchmarks/probes/v1_configs.py names them)
X_RING_CONFIGS = (8, 9, 10, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32)  # x's columns through
# the shared-memory ring (M <= 4, 8, 16, 32, 64; 11-12, 23-25, 27, 31-32: 32 rows; 13-16: the ortho stream first;
# 31-32: the sums in the ring)
ORTHO_FIRST_CONFIGS = (13, 14, 15, 16)
WARPS_CONFIGS = (17, 18, 19, 20, 21, 22)  # the x ring with 12 or 16 warps per block (lean only)
ROW_PAIR_CONFIGS = (11, 12, 20, 21, 22, 23, 24, 25, 27, 31, 32)  # two row tiles per block, lean (15 runs in full)


@pytest.mark.parametrize("cfg", range(V1_CONFIGS))
@pytest.mark.parametrize("n,k,gs,sym,dtype", [(200, 1000, 128, False, torch.bfloat16),   # short last K tile
                                              (300, 4096, 64, True, torch.float16),
                                              (129, 576, -1, False, torch.bfloat16),     # one group per row
                                              (64, 1024, 32, False, torch.float16),      # two groups per tile
                                              (96, 2048, 256, True, torch.bfloat16),     # a group per 4 tiles
                                              (150, 1002, 128, False, torch.bfloat16),   # K % 8 != 0: no x ring
                                              (4096, 4096, 128, False, torch.bfloat16)])
def test_every_v1_configuration(cfg, n, k, gs, sym, dtype):
    """Each v1 tuning configuration (register chunks or the shared-memory ring) against float64, M 1 up to its
    largest (8, 16, 32 or 64)."""
    gen = torch.Generator(device="cuda").manual_seed(cfg * 7 + n)
    layer = make_layer(n, k, 4, gs, sym, 0.02, dtype, gen)
    ext = cuda_backend.extension()
    for m in [m for m in (1, 3, 4, 8, 9, 16, 17, 32, 33, 64) if m <= V1_CONFIG_MAX_M[cfg]]:
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        if cfg in X_RING_CONFIGS + WARPS_CONFIGS and m == 3:  # rows not 16-byte aligned: the x ring must step aside
            x = torch.randn(m * k + 4, generator=gen, device="cuda").to(dtype)[4:].view(m, k)
        for alpha in (0.0, 1.0):
            y, _ = run_config(ext, layer, x, cfg, alpha)
            ref = reference64(layer, x, alpha) - layer.bias.double()
            assert rel_err(y, ref) < TOL[dtype], (cfg, m, alpha)


@pytest.fixture
def whole_row_pairs():
    """Two-row-tile blocks stay whole during the test (set_v1_row_pairs_split(False)): only lean forms cut them, which
    moves the ortho stream's fp32 sums (test_row_pair_blocks_...), so lean and full forms compare bit for bit only so."""
    ext = cuda_backend.extension()
    was = ext.v1_row_pairs_split()
    ext.set_v1_row_pairs_split(False)
    yield
    ext.set_v1_row_pairs_split(was)


@pytest.mark.usefixtures("whole_row_pairs")
@pytest.mark.parametrize("m", [1, 3, 4, 8, 16, 24, 64])
@pytest.mark.parametrize("n,k,gs", [(1000, 2048, 128), (300, 576, -1), (2100, 4096, 256), (130, 1024, 64)])
def test_lean_ring_kernels_match_the_full_kernels_bit_for_bit(m, n, k, gs):
    """A ring configuration's lean kernel (no fallback paths; set_v1_lean) gives the full kernel's output bit for
    bit at alpha 0 and 1, and the float64 reference's within bf16 tolerance. The ortho-first configurations
    (13-16) run their full kernel either way above v1_lean_ortho_first_max_m (v1.cuh launch_v1_ring), so there this
    checks only the reference and that no lean launch was counted; elsewhere the lean launches are counted. Two-row-tile
    blocks stay whole (whole_row_pairs)."""
    ext = cuda_backend.extension()
    gen = torch.Generator(device="cuda").manual_seed(m * 31 + n)
    layer = make_layer(n, k, 4, gs, False, 0.02, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    was = ext.v1_lean()

    def run(cfg, alpha, lean):
        ext.set_v1_lean(lean)
        return run_config(ext, layer, x, cfg, alpha)
    try:
        for cfg in [c for c in X_RING_CONFIGS if m <= V1_CONFIG_MAX_M[c]]:
            for alpha in (0.0, 1.0):
                y, lean_launches = run(cfg, alpha, True)
                full_only = cfg in ORTHO_FIRST_CONFIGS and m > ext.v1_lean_ortho_first_max_m()
                assert lean_launches == (0 if full_only else 1), (cfg, alpha)
                assert torch.equal(y, run(cfg, alpha, False)[0]), (cfg, alpha)
                ref = reference64(layer, x, alpha) - layer.bias.double()
                assert rel_err(y, ref) < TOL[torch.bfloat16], (cfg, alpha)
    finally:
        ext.set_v1_lean(was)


@pytest.mark.parametrize("m", [1, 4, 8, 16, 24, 40])
def test_row_pair_blocks_with_the_last_wave_in_single_tiles_match_the_pairs(m):
    """set_v1_row_pairs_split(True): the two-row-tile configurations' lean forms (which these calls run, counted) cut
    the last wave's work into single row tiles where that lowers the most tiles an SM gets (a grid of 7 SMs' worth of
    tiles less 30, and a partial last tile) at M <= 16. Every such configuration then gives the output of all-pair
    blocks bit for bit at alpha 0; at alpha 1 (empty rows and a very dense row in the ortho stream) the block's entries
    are cut into other runs, so its fp32 sums may round otherwise (seen at M >= 16, 2026-11-30): within one bf16 step
    of the pairs' output. At M > 16 blocks stay whole: bit for bit at alpha 1 too. All within bf16 tolerance of the
    float64 reference."""
    ext = cuda_backend.extension()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = 16 * (7 * sms - 30) + 8, 1024
    tiles = -(-n // 16)
    pairs = -(-tiles // 2)
    assert -(-tiles // sms) < 2 * -(-pairs // sms), "the shape must be one the cut applies to"
    gen = torch.Generator(device="cuda").manual_seed(m + 11)
    layer = make_layer(n, k, 4, 128, False, 0.0, torch.bfloat16, gen, csr=_merge_csr(n, k, 0.01, [37], gen, torch.bfloat16))
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    was = ext.v1_row_pairs_split()

    def run(cfg, alpha, split):
        ext.set_v1_row_pairs_split(split)
        y, lean_launches = run_config(ext, layer, x, cfg, alpha, layer.bias)
        assert lean_launches == 1, cfg
        return y
    try:
        cfgs = [c for c in ROW_PAIR_CONFIGS if m <= V1_CONFIG_MAX_M[c] and (m <= 16) == (V1_CONFIG_MAX_M[c] <= 16)]
        assert cfgs
        for cfg in cfgs:
            for alpha in (0.0, 1.0):
                y, y_pairs = run(cfg, alpha, True), run(cfg, alpha, False)
                if alpha == 0 or m > 16:
                    assert torch.equal(y, y_pairs), cfg
                else:
                    assert torch.allclose(y.float(), y_pairs.float(), rtol=2 ** -7, atol=1e-6), cfg
                for out in (y, y_pairs):
                    assert rel_err(out, reference64(layer, x, alpha)) < TOL[torch.bfloat16], (cfg, alpha)
    finally:
        ext.set_v1_row_pairs_split(was)


@pytest.mark.usefixtures("whole_row_pairs")
@pytest.mark.parametrize("m", [1, 2, 4])
def test_ortho_first_lean_forms_below_their_m_limit(m):
    """With set_v1_lean_ortho_first_max_m(4) the ortho-first configurations (13-16) run their lean kernels at M <= 4
    (counted) and give their full kernels' output bit for bit at alpha 0 and 1 (empty rows and a very dense row in
    the ortho stream), and the float64 reference's within bf16 tolerance. Two-row-tile blocks stay whole
    (whole_row_pairs)."""
    ext = cuda_backend.extension()
    gen = torch.Generator(device="cuda").manual_seed(m + 7)
    n, k = 2100, 4096
    layer = make_layer(n, k, 4, 128, False, 0.0, torch.bfloat16, gen, csr=_merge_csr(n, k, 0.01, [37], gen, torch.bfloat16))
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    was = ext.v1_lean_ortho_first_max_m()

    def run(cfg, alpha, limit):
        ext.set_v1_lean_ortho_first_max_m(limit)
        return run_config(ext, layer, x, cfg, alpha)
    try:
        for cfg in [c for c in ORTHO_FIRST_CONFIGS if m <= V1_CONFIG_MAX_M[c]]:
            for alpha in (0.0, 1.0):
                y, lean = run(cfg, alpha, 4)
                y_full, lean_full = run(cfg, alpha, 0)
                assert (lean, lean_full) == (1, 0), (cfg, alpha)
                assert torch.equal(y, y_full), (cfg, alpha)
                ref = reference64(layer, x, alpha) - layer.bias.double()
                assert rel_err(y, ref) < TOL[torch.bfloat16], (cfg, alpha)
    finally:
        ext.set_v1_lean_ortho_first_max_m(was)


@pytest.mark.parametrize("n,k,gs", [(1000, 2048, 128), (4096, 4096, 128), (300, 576, -1), (2100, 4096, 256),
                                    (130, 1000, 64), (70, 4096, 32), (576, 576, 128)])  # the last: SmolLM2's
def test_other_warp_counts_run_lean_or_as_eight_warps(n, k, gs):
    """Configurations 17-22 (12 or 16 warps per block) run their lean kernel where the call allows it and
    otherwise, like with the lean kernels off, the same configuration with 8 warps; the float64 reference
    either way. K = 1000 (a short last tile) and two groups per tile (32) are not for the ring."""
    ext = cuda_backend.extension()
    gen = torch.Generator(device="cuda").manual_seed(n + gs)
    layer = make_layer(n, k, 4, gs, False, 0.02, torch.bfloat16, gen)
    was = ext.v1_lean()
    try:
        for cfg in WARPS_CONFIGS:
            for m in (1, V1_CONFIG_MAX_M[cfg]):
                x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
                for lean in (True, False):
                    ext.set_v1_lean(lean)
                    for alpha in (0.0, 1.0):
                        y, lean_launches = run_config(ext, layer, x, cfg, alpha)
                        expect_lean = lean and k % 64 == 0 and gs != 32
                        assert lean_launches == int(expect_lean), (cfg, m, lean, alpha)
                        ref = reference64(layer, x, alpha) - layer.bias.double()
                        assert rel_err(y, ref) < TOL[torch.bfloat16], (cfg, m, lean, alpha)
    finally:
        ext.set_v1_lean(was)


def test_v1_table_set_get_and_refusal():
    """The v1 configuration table behind the default op: read back, refused entries change nothing, and with
    other configurations in every class the op still gives the reference result."""
    ext = cuda_backend.extension()
    old = list(ext.v1_table())
    assert len(old) == len(cuda_backend.V1_CLASSES)
    assert not ext.set_v1_table(old[:8] + [5] + old[9:])      # M 9-16 needs configuration 6 or 7
    assert not ext.set_v1_table([6] + old[1:])       # M <= 8 classes take 0-5
    assert not ext.set_v1_table(old[:2] + [8] + old[3:])  # 8 (x ring) serves M <= 4 only
    assert not ext.set_v1_table(old[:8] + [9] + old[9:])      # 9 (x ring, M <= 8) is not the M <= 16 kernel
    assert not ext.set_v1_table([10] + old[1:])      # 10 (x ring, M <= 16) is not the M <= 8 kernel
    assert not ext.set_v1_table(old[:8] + [11] + old[9:])     # 11 (32 rows, M <= 8) is not the M <= 16 kernel
    assert not ext.set_v1_table(old[:-1] + [len(V1_CONFIG_MAX_M)])  # no such configuration
    assert not ext.set_v1_table(old[:5] + [26] + old[6:])  # 26 (M <= 32) is not the M <= 16 kernel
    assert not ext.set_v1_table(old[:-2] + [10] + old[-1:])  # 10 (M <= 16) cannot serve M 17-32
    assert not ext.set_v1_table(old[:-2] + [30] + old[-1:])  # 30 is the M <= 64 kernel
    assert not ext.set_v1_table(old[:-1] + [32])     # 32 (M <= 32) cannot serve M 33-64
    assert not ext.set_v1_table(old[:-1])            # wrong length
    assert list(ext.v1_table()) == old
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tall_n = 16 * 3 * sms + 16
    short_n = 16 * sms + 48  # from one row tile per SM: not tiny
    cases = [(short_n, 8192, 2), (short_n, 1024, 3), (short_n, 1024, 7), (tall_n, 512, 4), (tall_n, 512, 8),
             (512, 1024, 12), (tall_n, 1024, 16), (512, 1024, 5), (512, 8192, 16),
             (short_n, 1024, 24), (512, 1024, 32), (4096, 1024, 48)]  # one per class, in order (M 17-64: the table
    # at alpha 0; at alpha 1 these small layers' 2 % ortho takes the merge path)
    gen = torch.Generator(device="cuda").manual_seed(5)
    try:
        for table in ([3, 4, 5, 4, 3, 7, 6, 2, 7, 26, 27, 30], [5, 3, 4, 0, 2, 6, 7, 0, 6, 28, 29, 31],
                      [8, 8, 2, 8, 1, 6, 10, 9, 10, 29, 28, 30], [9, 8, 9, 9, 9, 10, 12, 20, 22, 27, 26, 31],
                      [11, 11, 11, 11, 11, 12, 12, 18, 12, 26, 26, 30], [20, 17, 21, 19, 18, 22, 22, 20, 22, 32, 32, 31]):
            assert ext.set_v1_table(table) and list(ext.v1_table()) == table
            for n, k, m in cases:
                layer = make_layer(n, k, 4, 128, False, 0.02, torch.bfloat16, gen)
                x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
                for alpha in (0.0, 1.0):
                    layer.alpha = alpha
                    poison_allocator()
                    assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[torch.bfloat16], (table, n, k, m)
    finally:
        assert ext.set_v1_table(old)


def test_heavy_ortho_on_a_tall_grid():
    """From 2^20 ortho entries (alpha != 0) a tall grid takes the short classes' configurations at M >= 2 (v1.cu
    kHeavyOrtho); at alpha 0 and at M = 1 the same layer keeps the tall ones. All against the float64 reference."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(11)
    layer = make_layer(16 * 3 * sms + 16, 4096, 4, 128, False, 0.05, torch.bfloat16, gen)
    assert layer.ortho_nnz >= 2 ** 20
    for m in (1, 3, 8, 16):
        x = torch.randn(m, 4096, generator=gen, device="cuda").to(torch.bfloat16)
        for alpha in (0.0, 0.5, 1.0):
            layer.alpha = alpha
            poison_allocator()
            assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[torch.bfloat16], (m, alpha)


@pytest.mark.parametrize("case", ["int32-columns", "more-than-staged", "odd-nnz", "misaligned-csr"])
@pytest.mark.parametrize("m", [1, 6, 16, 40])
def test_ortho_staging_edge_cases(case, m):
    """v1's warps copy their first 256 (128 at M > 32) CSR entries each to shared memory in 4-byte words:
    int32 columns, tiles with more entries than that, an odd entry count (last word read half) and arrays
    not 4-byte aligned (no staging) must all give the reference result."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    n, k = 200, 576
    w_dense = torch.zeros(n, k, device="cuda")
    if case == "odd-nnz":
        idx = torch.randperm(n * k, generator=gen, device="cuda")[:2 * 577 + 1]
    else:
        idx = torch.randperm(n * k, generator=gen, device="cuda")[: int(n * k * (0.3 if case == "more-than-staged" else 0.05))]
    w_dense.view(-1)[idx] = torch.randn(idx.numel(), generator=gen, device="cuda")
    from libortho.sieve import csr_from_indices
    csr = csr_from_indices(w_dense, idx.sort().values, torch.bfloat16)
    layer = make_layer(n, k, 4, 128, False, 0.0, torch.bfloat16, gen, csr=csr)
    if case == "odd-nnz":
        assert layer.ortho_nnz % 2 == 1
    if case == "int32-columns":
        layer.col_idx = layer.col_idx.to(torch.int32)
    if case == "misaligned-csr":
        layer.col_idx = torch.cat([layer.col_idx[:1], layer.col_idx])[1:]
        layer.values = torch.cat([layer.values[:1], layer.values])[1:]
        assert layer.col_idx.data_ptr() % 4 != 0
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    for alpha in (0.5, 1.0):
        layer.alpha = alpha
        poison_allocator()
        assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 16, 40, 200])
def test_alpha_zero_never_reads_ortho(m, variant):
    gen = torch.Generator(device="cuda").manual_seed(1)
    layer = make_layer(256, 512, 4, 128, True, 0.05, torch.bfloat16, gen)
    x = torch.randn(m, 512, generator=gen, device="cuda").to(torch.bfloat16)
    layer.alpha = 0.0
    clean = layer(x)
    layer.values.fill_(float("nan"))
    layer.col_idx.fill_(30000)  # out of range if it were read
    y = layer(x)
    torch.cuda.synchronize()
    assert torch.equal(y, clean)


def test_cuda_equals_reference_backend_closely(variant):
    gen = torch.Generator(device="cuda").manual_seed(2)
    layer = make_layer(512, 576, 4, 128, True, 0.01, torch.bfloat16, gen)
    x = torch.randn(4, 576, generator=gen, device="cuda").to(torch.bfloat16)
    ref = libortho.ops.ortho_linear_reference(x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr,
                                              layer.col_idx, layer.values, layer.bias, 1.0, 4, 128, 512, 576)
    assert rel_err(layer(x), ref.double()) < 1e-2


SMALL_CASES = [((n, k), m, bits, gs, sym, density, alpha, dtype)
               for (n, k), m in [((64, 4096), 1), ((1024, 4096), 1), ((1024, 4096), 16), ((4096, 4096), 16),
                                 ((576, 576), 12), ((100, 1000), 5), ((48, 90), 16), ((4096, 11008), 3)]
               for bits, gs, sym in [(4, 128, True), (3, 128, False), (2, 64, True), (8, -1, False)]
               for density, alpha in [(0.01, 1.0), (0.05, 0.5)]
               for dtype in [torch.bfloat16, torch.float16]]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_small_m_split_and_partial_tiles(case, variant):
    """Small N (cluster split-K in v2), M up to 16, K not a multiple of 64 or 8, all bit widths."""
    (n, k), m, bits, gs, sym, density, alpha, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)
    layer = make_layer(n, k, bits, gs, sym, density, dtype, gen)
    layer.alpha = alpha
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    poison_allocator()
    assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 4, 16])
def test_x_not_16_byte_aligned(m, variant):
    """x aligned to 4 bytes only: v2 stages it with 4-byte copies."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    layer = make_layer(320, 576, 4, 128, True, 0.02, torch.bfloat16, gen)
    buf = torch.randn(m * 576 + 2, generator=gen, device="cuda").to(torch.bfloat16)
    x = buf[2:].view(m, 576)
    assert x.data_ptr() % 16 != 0 and x.data_ptr() % 4 == 0
    assert rel_err(layer(x), reference64(layer, x, 1.0)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 16])
def test_deterministic(m, variant):
    """Same inputs, same bits (no float atomics whose order varies), with a dense ortho stream."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    layer = make_layer(1024, 4096, 4, 128, True, 0.05, torch.bfloat16, gen)
    x = torch.randn(m, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    first = layer(x)
    for _ in range(3):
        assert torch.equal(layer(x), first)


def test_variants_agree():
    gen = torch.Generator(device="cuda").manual_seed(6)
    layer = make_layer(4096, 4096, 4, 128, True, 0.01, torch.bfloat16, gen)
    x = torch.randn(2, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    ys = []
    for v in cuda_backend.DECODE_KERNELS:
        cuda_backend.set_decode_kernel(v)
        ys.append(layer(x).double())
    cuda_backend.set_decode_kernel(None)
    for y in ys[1:]:
        assert rel_err(y, ys[0]) < 1e-2


@pytest.mark.parametrize("n,k,m,bits,gs", [(4096, 11008, 16, 4, 128), (4096, 14336, 8, 4, 128),
                                            (4096, 14336, 1, 4, 128), (4096, 14336, 4, 3, 32),
                                            (1024, 11008, 2, 2, 64), (16, 64, 3, 4, -1), (17, 4100, 5, 8, 128)])
def test_v3_split_and_fallback_boundaries(n, k, m, bits, gs):
    """v3 around its shared-memory budget: x slices that need the cluster split, and ones that run v1."""
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    layer = make_layer(n, k, bits, gs, False, 0.01, torch.bfloat16, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    cuda_backend.set_decode_kernel("v3")
    try:
        for alpha in (0.0, 1.0):
            layer.alpha = alpha
            poison_allocator()
            assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[torch.bfloat16]
    finally:
        cuda_backend.set_decode_kernel(None)


@pytest.mark.parametrize("m", [17, 64])
def test_v3_binding_above_16_rows_runs_v1(m):
    gen = torch.Generator(device="cuda").manual_seed(7)
    layer = make_layer(256, 576, 4, 128, True, 0.02, torch.bfloat16, gen)
    x = torch.randn(m, 576, generator=gen, device="cuda").to(torch.bfloat16)
    ext = cuda_backend.extension()
    args = (x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias, 1.0,
            4, 128, 256, 576, 0)
    assert torch.equal(cuda_backend._checked(ext.fused_small_m_v3(*args)), cuda_backend._checked(ext.fused_small_m(*args)))


def test_decode_kernel_switch(monkeypatch):
    for v in ("v1", "v2", "v3"):
        monkeypatch.setenv("LIBORTHO_DECODE_KERNEL", v)
        assert cuda_backend.decode_kernel() == v
    cuda_backend.set_decode_kernel("v3")
    monkeypatch.setenv("LIBORTHO_DECODE_KERNEL", "v1")
    assert cuda_backend.decode_kernel() == "v3"
    cuda_backend.set_decode_kernel(None)
    assert cuda_backend.decode_kernel() == "v1"
    monkeypatch.setenv("LIBORTHO_DECODE_KERNEL", "v9")
    with pytest.raises(ValueError):
        cuda_backend.decode_kernel()
    with pytest.raises(ValueError):
        cuda_backend.set_decode_kernel("v9")


@pytest.mark.parametrize("mode", ["1", "late", "noprefetch", "late-noprefetch", "first", "late-first", "first-noxt"])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("xt_min", [None, 0])
def test_pdl_chain_matches_plain_launches(m, mode, xt_min, monkeypatch, ortho_xt):
    """With $LIBORTHO_PDL on a v1 launch may start while the previous kernel drains (and, late, let its dependents
    start after its main loop). In a chain where each layer reads the previous output (directly, and through an
    ordinary elementwise kernel) the bits must equal plain launches, eagerly and replayed from a CUDA graph; with
    v1's threshold as it is, and at 0 (x transposed before every product at M >= 2, which "first-noxt" launches
    plainly)."""
    if xt_min is not None:
        ortho_xt(xt_min)
    gen = torch.Generator(device="cuda").manual_seed(11)
    layers = [make_layer(512, 512, 4, 128, True, 0.01, torch.bfloat16, gen, bias=(i % 2 == 0)) for i in range(6)]
    x = torch.randn(m, 512, generator=gen, device="cuda").to(torch.bfloat16)

    def chain():
        y = x
        for i, layer in enumerate(layers):
            y = layer(y)
            if i % 3 == 2:
                y = y * 0.01  # an ordinary kernel between two fused ones
        return y

    cuda_backend.set_decode_kernel("v1")
    monkeypatch.setenv("LIBORTHO_PDL_MAX_M", "none")  # PDL at every M here, not only the default's one row
    try:
        monkeypatch.setenv("LIBORTHO_PDL", "0")
        plain = chain()
        monkeypatch.setenv("LIBORTHO_PDL", mode)
        assert cuda_backend.pdl_enabled()
        poison_allocator()
        assert torch.equal(chain(), plain)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            chain()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = chain()
        for _ in range(3):
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, plain)
    finally:
        cuda_backend.set_decode_kernel(None)


@pytest.fixture
def ortho_xt():
    """Set v1's transposed-x threshold for a test (0: always at M >= 2, -1: never); restored after."""
    ext = cuda_backend.extension()
    old = ext.ortho_xt_min()
    yield ext.set_ortho_xt_min
    ext.set_ortho_xt_min(old)


@pytest.mark.parametrize("mode", [0, -1])
@pytest.mark.parametrize("n,k,dtype", [(200, 1000, torch.bfloat16), (300, 4096, torch.float16), (64, 578, torch.bfloat16)])
def test_ortho_reads_x_transposed(ortho_xt, mode, n, k, dtype):
    """v1's ortho stream with x transposed (mode 0) and without (-1): float64 reference at every M it
    serves, alpha 0.5 and 1, dense and empty rows; a CUDA graph of the transposed path replays the same."""
    ortho_xt(mode)
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w_dense = torch.zeros(n, k, device="cuda")
    idx = torch.randperm(n * k, generator=gen, device="cuda")[: n * k // 20]
    w_dense.view(-1)[idx] = torch.randn(idx.numel(), generator=gen, device="cuda")
    w_dense[3] = torch.randn(k, generator=gen, device="cuda")  # one full row
    w_dense[5] = 0.0                                          # one empty row
    from libortho.sieve import csr_from_indices
    csr = csr_from_indices(w_dense, w_dense.flatten().nonzero().flatten(), dtype)
    layer = make_layer(n, k, 4, 128, False, 0.0, dtype, gen, csr=csr)
    for m in (2, 3, 4, 5, 8, 9, 16):
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        for alpha in (0.5, 1.0):
            layer.alpha = alpha
            poison_allocator()
            assert rel_err(layer(x), reference64(layer, x, alpha)) < TOL[dtype], (mode, m, alpha)
    if mode == 0:
        x = torch.randn(8, k, generator=gen, device="cuda").to(dtype)
        eager = layer(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = layer(x)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)


def _merge_csr(n, k, density, dense_rows, gen, dtype):
    """Random entries at `density`, plus full rows at `dense_rows` and a band of rows at 20 % right after the
    first of them (more entries than a block of the large-M path stages), one row left empty."""
    mask = torch.rand(n, k, generator=gen, device="cuda") < density
    for r in dense_rows:
        mask[r] = True
        mask[r + 1:r + 17] |= torch.rand(min(16, n - r - 1), k, generator=gen, device="cuda") < 0.2
    mask[n // 2] = False
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
    from libortho.sieve import csr_from_indices
    return csr_from_indices(torch.randn(n, k, generator=gen, device="cuda"), idx, dtype)


@pytest.mark.parametrize("n,k,density,dense_rows", [
    (1024, 4096, 0.01, []), (1024, 4096, 0.05, [3]), (4096, 4096, 0.01, []), (4096, 4096, 0.05, [40]),
    (11008, 4096, 0.05, []), (11008, 4096, 0.2, []), (200, 576, 0.3, [7]), (37, 200, 0.5, []),
    (48, 40000, 0.01, [0]), (300, 4100, 0.02, [290]),
    (14336, 4096, 0.02, [100])])  # 896 blocks: more than 6 per SM on a 132-SM card (the 7-block form)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_merge_adds_every_entry_exactly_once(n, k, density, dense_rows, dtype):
    """The large-M path's W at alpha equals its own alpha-0 W plus alpha * S entry by entry, bit for bit (alpha
    a power of two, so the kernel's fused multiply-add rounds as torch's multiply then add): across K split
    between blocks, rows past a block's staging capacity, empty and full rows, int16 and int32 columns."""
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    csr = _merge_csr(n, k, density, dense_rows, gen, dtype)
    layer = make_layer(n, k, 4, 128, False, 0.0, dtype, gen, bias=False, csr=csr)
    ext = cuda_backend.extension()
    like = torch.empty(1, k, device="cuda", dtype=dtype)

    def w_at(alpha):
        poison_allocator()
        return cuda_backend._checked(ext.dequant_merge(like, layer.qweight, layer.scales, layer.zeros, layer.row_ptr,
                                                       layer.col_idx, layer.values, alpha, 4, 128, n, k))

    w0 = w_at(0.0)
    rows = torch.repeat_interleave(torch.arange(n, device="cuda"), layer.row_ptr.diff().long())
    cols = layer.col_idx.long()
    for alpha in (1.0, 0.5, -2.0):
        want = w0.clone()
        want[rows, cols] = (w0[rows, cols].float() + alpha * layer.values.float()).to(dtype)
        got = w_at(alpha)
        assert torch.isfinite(got).all()
        bad = (got != want).nonzero()
        assert bad.numel() == 0, f"alpha {alpha}: {bad.shape[0]} elements differ, first at {bad[:3].tolist()}"


def test_bad_calls_raise_python_errors():
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = make_layer(64, 128, 4, 128, True, 0.01, torch.bfloat16, gen)
    ext = cuda_backend.extension()
    with pytest.raises(RuntimeError, match="invalid arguments"):
        cuda_backend._checked(ext.fused_small_m(torch.randn(65, 128, device="cuda", dtype=torch.bfloat16),
                                              layer.qweight, layer.scales, None, layer.row_ptr, layer.col_idx,
                                              layer.values, None, 1.0, 4, 128, 64, 128, False))
    with pytest.raises(RuntimeError, match="invalid arguments"):
        cuda_backend._checked(ext.fused_small_m(torch.randn(1, 128, device="cuda", dtype=torch.bfloat16),
                                              layer.qweight[:, :, :64].contiguous(), layer.scales, None,
                                              layer.row_ptr, layer.col_idx, layer.values, None, 1.0, 4, 128, 64, 128,
                                              0))
    for fused in (ext.fused_small_m, ext.fused_small_m_v2, ext.fused_small_m_v3):
        with pytest.raises(RuntimeError, match="invalid arguments"):
            cuda_backend._checked(fused(torch.randn(65, 128, device="cuda", dtype=torch.bfloat16), layer.qweight,
                                        layer.scales, None, layer.row_ptr, layer.col_idx, layer.values, None, 1.0, 4,
                                        128, 64, 128, False))
    with pytest.raises(RuntimeError, match="invalid arguments"):
        cuda_backend._checked(ext.dequant_merge(torch.randn(2, 128, device="cuda"), layer.qweight, layer.scales, None, layer.row_ptr,
                              layer.col_idx, layer.values, 1.0, 4, 128, 64, 128))


def _tiny_llama():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_model
    model = tiny_model("llama")
    libortho.decompose(model, OrthoConfig(bits=4, group_size=32, density=0.02), progress=False)
    return model.to("cuda", torch.bfloat16)


@torch.no_grad()  # inference: the op has no backward, and compile would otherwise trace one
def test_torch_compile_matches_eager():
    """Compiled == eager up to what inductor's bf16 fusions change in the same model without LibOrtho."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_model
    ids = torch.randint(3, 256, (2, 16), device="cuda")
    dense = tiny_model("llama").to("cuda", torch.bfloat16)
    torch._dynamo.reset()
    base_err = rel_err(torch.compile(dense)(ids).logits, dense(ids).logits.double())
    model = _tiny_llama()
    for alpha in (1.0, 0.0):
        with libortho.alpha(model, alpha):
            eager = model(ids).logits
            torch._dynamo.reset()
            out = torch.compile(model)(ids).logits
            assert torch.isfinite(out).all(), f"alpha={alpha}: non-finite compiled output"
            err = rel_err(out, eager.double())
            assert err < max(1e-2, 2 * base_err), f"alpha={alpha}: compiled vs eager {err:.3g}, dense model {base_err:.3g}"


@torch.no_grad()
def test_cuda_graph_capture_matches_eager(variant):
    model = _tiny_llama()
    ids = torch.randint(3, 256, (1, 8), device="cuda")
    eager = model(ids, use_cache=False).logits
    static_ids = ids.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(static_ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(static_ids, use_cache=False).logits
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


# The one-kernel large-M product (gemm_sm90.cu, LIBORTHO_PREFILL=gemm): INT4, K a multiple of 64.
GEMM_SHAPES = [(128, 64), (200, 576), (37, 128), (1000, 1536), (4096, 4096), (11008, 4096), (300, 4160)]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel is built for sm_90a only")
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 17, 64, 65, 130, 512])
@pytest.mark.parametrize("gs,sym,dtype", [(128, True, torch.bfloat16), (64, False, torch.float16),
                                          (-1, False, torch.bfloat16), (128, False, torch.float16)])
def test_large_m_gemm_matches_float64_and_the_dequant_path(shape, m, gs, sym, dtype):
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + m * 3 + k)
    layer = make_layer(n, k, 4, gs, sym, 0.0, dtype, gen, bias=m % 2 == 0)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    ext = cuda_backend.extension()
    gsz = quant.effective_group_size(layer.group_size, k)  # what the layer passes the op (-1: one group per row)
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias, 0.0, 4,
            gsz, n, k)
    # the dequantize + cuBLAS path sums the same products (the same rounded weights) in another order
    w = cuda_backend._checked(ext.dequant_merge(x, *args[:6], 0.0, 4, gsz, n, k))
    want = torch.nn.functional.linear(x, w, layer.bias).double()
    ref = reference64(layer, x, 0.0)
    try:
        for cfg in (-1, *range(cuda_backend.GEMM_CFGS)):  # -1: chosen per call
            assert ext.set_gemm_cfg(cfg)
            poison_allocator()
            y = cuda_backend._checked(ext.gemm_int4(x, *args), "gemm")
            assert y.shape == (m, n) and y.dtype == dtype
            err = rel_err(y, ref)
            assert err < TOL[dtype], f"configuration {cfg}: rel err {err:.3g}"
            close = rel_err(y, want)
            assert close < (4e-3 if dtype == torch.bfloat16 else 1e-3), f"configuration {cfg}: vs dequant + cuBLAS {close:.3g}"
            # split-K slices are summed in a fixed order: the same call gives the same bits
            assert torch.equal(cuda_backend._checked(ext.gemm_int4(x, *args), "gemm"), y), f"configuration {cfg}"
    finally:
        ext.set_gemm_cfg(-1)
    assert not ext.set_gemm_cfg(cuda_backend.GEMM_CFGS) and not ext.set_gemm_cfg(-2) and ext.gemm_cfg() == -1


@pytest.mark.parametrize("shape", [(128, 64), (200, 576), (1000, 1536), (4096, 4096), (300, 4160), (150, 1000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [17, 24, 32, 33, 48, 64])
@pytest.mark.parametrize("density,alpha,dtype", [(0.005, 1.0, torch.bfloat16), (0.05, 0.5, torch.float16),
                                                 (0.0, 1.0, torch.bfloat16), (0.01, -1.0, torch.float16)])
def test_v1_at_17_to_64_tokens_matches_float64(shape, m, density, alpha, dtype):
    """v1 at M 17-64 (fused_small_m): the base by the table's M <= 32 or 64 configuration (lean where the ring takes the
    call: K = 1000 does not), an ortho stream in play added after it by the ortho add; against float64, outputs
    poisoned, and the stream really added (alpha 0 differs where there are entries)."""
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(n + 7 * m + int(1000 * density))
    layer = make_layer(n, k, 4, 128, m % 2 == 0, density, dtype, gen, bias=m != 17)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    ext = cuda_backend.extension()
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias)
    gsz = quant.effective_group_size(layer.group_size, k)
    poison_allocator()
    y = cuda_backend._checked(ext.fused_small_m(x, *args, alpha, 4, gsz, n, k, 0))
    assert rel_err(y, reference64(layer, x, alpha)) < TOL[dtype]
    base = cuda_backend._checked(ext.fused_small_m(x, *args, 0.0, 4, gsz, n, k, 0))
    assert rel_err(base, reference64(layer, x, 0.0)) < TOL[dtype]
    assert torch.equal(y, base) == (layer.ortho_nnz == 0)


@pytest.mark.parametrize("m", [17, 32, 64])
def test_v1_at_17_to_64_tokens_with_empty_rows_and_one_very_dense_row(m):
    n, k, dtype = 4096, 1024, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(m)
    dense = torch.zeros(n, k, device="cuda")
    dense[7] = torch.randn(k, generator=gen, device="cuda")              # a full row
    dense[3000, ::3] = torch.randn(342, generator=gen, device="cuda")    # a dense-ish row; the rest empty
    from libortho.sieve import csr_from_indices
    layer = make_layer(n, k, 4, 128, True, 0.0, dtype, gen,
                       csr=csr_from_indices(dense, torch.nonzero(dense.reshape(-1)).reshape(-1), dtype))
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    ext = cuda_backend.extension()
    for alpha in (0.0, 0.5, 1.0):
        poison_allocator()
        y = cuda_backend._checked(ext.fused_small_m(x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr,
                                                    layer.col_idx, layer.values, layer.bias, alpha, 4, 128, n, k,
                                                    0))
        assert rel_err(y, reference64(layer, x, alpha)) < TOL[dtype], alpha


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel is built for sm_90a only")
@pytest.mark.parametrize("shape", [(128, 64), (200, 576), (1000, 1536), (4096, 4096), (300, 4160)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [17, 32, 33, 64])
@pytest.mark.parametrize("density,alpha,dtype", [(0.005, 1.0, torch.bfloat16), (0.05, 0.5, torch.float16),
                                                 (0.05, -1.0, torch.bfloat16), (0.01, 1.0, torch.float16)])
def test_gemm_ortho_add_matches_float64_and_the_dequant_path(shape, m, density, alpha, dtype):
    """At M <= 64 the GEMM takes an ortho stream: the base in the wgmma kernel, alpha * x @ S^T added after it."""
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(n + 13 * m + int(1000 * density))
    layer = make_layer(n, k, 4, 128, m % 2 == 0, density, dtype, gen, bias=m != 17)
    assert layer.ortho_nnz > 0
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    ext = cuda_backend.extension()
    gsz = quant.effective_group_size(layer.group_size, k)
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias, alpha,
            4, gsz, n, k)
    w = cuda_backend._checked(ext.dequant_merge(x, *args[:6], alpha, 4, gsz, n, k))
    want = torch.nn.functional.linear(x, w, layer.bias).double()
    ref = reference64(layer, x, alpha)
    base_only = cuda_backend._checked(ext.gemm_int4(x, *args[:7], 0.0, *args[8:]), "gemm")
    try:
        for cfg in (-1, 2, 7):
            assert ext.set_gemm_cfg(cfg)
            poison_allocator()
            y = cuda_backend._checked(ext.gemm_int4(x, *args), "gemm")
            assert y.shape == (m, n) and y.dtype == dtype
            assert rel_err(y, ref) < TOL[dtype], f"configuration {cfg}"
            assert rel_err(y, want) < (8e-3 if dtype == torch.bfloat16 else 2e-3), f"configuration {cfg}"
            assert not torch.equal(y, base_only)  # the stream really was added
            assert torch.equal(cuda_backend._checked(ext.gemm_int4(x, *args), "gemm"), y), f"configuration {cfg}"
    finally:
        ext.set_gemm_cfg(-1)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel is built for sm_90a only")
@pytest.mark.parametrize("m,alpha,n,k", [(17, 1.0, 1024, 2048), (40, 1.0, 1024, 2048), (64, 0.0, 1024, 2048),
                                         (65, 1.0, 1024, 2048), (65, 0.0, 1024, 2048), (300, 1.0, 1024, 2048),
                                         (32, 1.0, 4096, 4096), (48, 1.0, 14336, 4096), (17, 0.0, 1024, 2048),
                                         (32, 0.0, 4096, 4096), (24, 0.0, 14336, 4096), (33, 0.0, 1024, 2048),
                                         (48, 0.0, 4096, 4096), (40, 1.0, 4096, 14336), (64, 1.0, 4096, 4096)])
def test_default_policy_runs_the_gemm_up_to_64_tokens(m, alpha, n, k, monkeypatch):
    """The default (auto) policy: v1's ring at 17-32 tokens (+ the ortho add where that beat merging) and at 33-64
    on 4096-row layers (one wave of 32-row blocks on a 132-SM card), the GEMM (+ ortho add where it measured faster)
    otherwise up to 64 tokens, dequantize + cuBLAS above; the layer's output is that path's bit for bit (the GEMM
    without split-K can equal cuBLAS's bits, so the calls are counted)."""
    monkeypatch.delenv("LIBORTHO_PREFILL", raising=False)
    gen = torch.Generator(device="cuda").manual_seed(m)
    layer = make_layer(n, k, 4, 128, False, 0.01, torch.bfloat16, gen)
    layer.alpha = alpha
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    ext = cuda_backend.extension()
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values)
    gemm, code = ext.gemm_int4(x, *args, layer.bias, alpha, 4, 128, n, k)
    assert code == (1 if m > 64 and alpha != 0 else 0)  # the ortho add stops at 64 tokens: cudaErrorInvalidValue
    w = cuda_backend._checked(ext.dequant_merge(x, *args, alpha, 4, 128, n, k))
    dequant = torch.nn.functional.linear(x, w, layer.bias)
    assert cuda_backend.prefill() == "auto"
    v1 = cuda_backend._checked(ext.fused_small_m(x, *args, layer.bias, alpha, 4, 128, n, k, 0)) if m <= 64 else None
    y, calls = with_counted_calls(monkeypatch, ext, lambda: layer(x))
    work = layer.ortho_nnz * m if alpha != 0 else 0
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    takes_v1 = cuda_backend.use_v1_wide("auto", m, work, n * k, n, sms)
    takes_gemm = cuda_backend.use_gemm("auto", m, work, n * k) and code == 0
    # 1 % ortho: within what the add measured to win on both layer sizes at 17-32; above, where the GEMM's add is
    # (4096x4096 at alpha 1 is below its layer size: the merge path)
    wide = n == 4096 and 128 <= sms <= 256 and (alpha == 0 or n * k >= cuda_backend.GEMM_ORTHO_MIN_WEIGHTS[64])
    assert takes_v1 == (17 <= m <= 32 or (32 < m <= 64 and wide))
    assert calls == (["fused_small_m"] if takes_v1 else ["gemm_int4"] if takes_gemm else ["dequant_merge"])
    assert torch.equal(y, v1 if takes_v1 else gemm if takes_gemm else dequant)
    assert rel_err(y, reference64(layer, x, alpha)) < TOL[torch.bfloat16]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="the wgmma kernel is built for sm_90a only")
@pytest.mark.parametrize("alpha,density", [(0.0, 0.0), (0.0, 0.02), (1.0, 0.02), (0.5, 0.0)])
def test_prefill_switch_runs_the_gemm_where_it_can(alpha, density):
    """LIBORTHO_PREFILL=gemm: the layer's output is the gemm kernel's bit for bit where it takes the call (no
    ortho stream in play), the dequant path's otherwise; both match float64."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    layer = make_layer(1024, 1024, 4, 128, True, density, torch.bfloat16, gen)
    layer.alpha = alpha
    x = torch.randn(2, 100, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    ext = cuda_backend.extension()
    x2 = x.reshape(-1, 1024)
    direct = cuda_backend._checked(ext.gemm_int4(x2, layer.qweight, layer.scales, layer.zeros, layer.row_ptr,
                                                 layer.col_idx, layer.values, layer.bias, 0.0, 4, 128, 1024, 1024))
    try:
        cuda_backend.set_prefill("gemm")
        y = layer(x)
    finally:
        cuda_backend.set_prefill(None)
    takes = alpha == 0 or layer.ortho_nnz == 0
    assert torch.equal(y.reshape(-1, 1024), direct) == takes
    assert rel_err(y.reshape(-1, 1024), reference64(layer, x2, alpha)) < TOL[torch.bfloat16]


def test_gemm_refuses_what_it_cannot_run():
    gen = torch.Generator(device="cuda").manual_seed(4)
    ext = cuda_backend.extension()
    # INT3; K = 200 (not a multiple of 64; one group per row); groups of 32 columns; ortho entries at alpha 1
    for bits, k, gs, density in [(3, 256, 128, 0.0), (4, 200, -1, 0.0), (4, 256, 32, 0.0), (4, 256, 128, 0.05)]:
        layer = make_layer(64, k, bits, gs, True, density, torch.bfloat16, gen)
        x = torch.randn(80, k, device="cuda", dtype=torch.bfloat16)  # ortho at alpha 1: only up to 64 tokens
        with pytest.raises(RuntimeError, match="cudaError 1"):  # cudaErrorInvalidValue from the launcher
            cuda_backend._checked(ext.gemm_int4(x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr,
                                                layer.col_idx, layer.values, None, 1.0, bits,
                                                quant.effective_group_size(gs, k), 64, k))


# CUTLASS's mixed-input GEMM on the packed tiles (gemm_cutlass.cu, LIBORTHO_PREFILL=cutlass; a build with CUTLASS).
CUTLASS_SHAPES = [(128, 64), (1008, 1536), (4096, 4096), (11008, 4096), (256, 4160)]


def cutlass_built() -> bool:
    ext = cuda_backend.extension()
    return ext is not None and ext.gemm_cutlass_built()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="CUTLASS's mixed-input GEMM is built for sm_90a only")
@pytest.mark.parametrize("shape", CUTLASS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 17, 64, 130, 512])
@pytest.mark.parametrize("gs,sym,dtype", [(128, True, torch.bfloat16), (64, False, torch.float16),
                                          (-1, False, torch.bfloat16), (128, False, torch.float16)])
@pytest.mark.parametrize("form", [0, 1], ids=["coop128", "ping64"])
def test_cutlass_gemm_matches_float64_and_the_dequant_path(shape, m, gs, sym, dtype, form):
    if not cutlass_built():
        pytest.skip("built without CUTLASS (see ops/cuda.py cutlass_include)")
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(n * 5 + m * 11 + k)
    layer = make_layer(n, k, 4, gs, sym, 0.0, dtype, gen, bias=m % 2 == 0)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    ext = cuda_backend.extension()
    gsz = quant.effective_group_size(layer.group_size, k)
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias, 0.0, 4,
            gsz, n, k, form)
    w = cuda_backend._checked(ext.dequant_merge(x, *args[:6], 0.0, 4, gsz, n, k))
    want = torch.nn.functional.linear(x, w, layer.bias).double()
    poison_allocator()
    y = cuda_backend._checked(ext.gemm_cutlass(x, *args), "CUTLASS GEMM")
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, reference64(layer, x, 0.0)) < TOL[dtype]
    # CUTLASS rounds s q and then s q + z' (the dequantize step rounds (q - z) s once): a little looser than the
    # wgmma kernel's bound against the same path
    close = rel_err(y, want)
    assert close < (6e-3 if dtype == torch.bfloat16 else 1.5e-3), f"vs dequant + cuBLAS {close:.3g}"
    assert torch.equal(cuda_backend._checked(ext.gemm_cutlass(x, *args), "CUTLASS GEMM"), y)  # no split: same bits


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="CUTLASS's mixed-input GEMM is built for sm_90a only")
def test_cutlass_switch_and_refusals():
    """LIBORTHO_PREFILL=cutlass: CUTLASS's output bit for bit where it takes the call, the dequant path's where it
    cannot (an ortho stream in play, N not a multiple of 16, K not of 64, groups of 32, INT3), all against float64."""
    if not cutlass_built():
        pytest.skip("built without CUTLASS (see ops/cuda.py cutlass_include)")
    gen = torch.Generator(device="cuda").manual_seed(9)
    ext = cuda_backend.extension()
    cases = [(1024, 1024, 4, 128, 0.0, 0.0, True), (1024, 1024, 4, 128, 0.02, 1.0, False),
             (1024, 1024, 4, 128, 0.02, 0.0, True), (1000, 1024, 4, 128, 0.0, 0.0, False),
             (1024, 1000, 4, -1, 0.0, 0.0, False), (1024, 1024, 4, 32, 0.0, 0.0, False),
             (1024, 1024, 3, 128, 0.0, 0.0, False)]
    for n, k, bits, gs, density, alpha, takes in cases:
        layer = make_layer(n, k, bits, gs, True, density, torch.bfloat16, gen)
        layer.alpha = alpha
        x = torch.randn(200, k, generator=gen, device="cuda").to(torch.bfloat16)
        gsz = quant.effective_group_size(gs, k)
        args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                alpha, bits, gsz, n, k)
        direct, code = ext.gemm_cutlass(x, *args, 0)  # the form the switch picks for these small layers
        assert (code == 0) == takes, (n, k, bits, gs, density, alpha, code)  # -1: refused by the binding
        assert cuda_backend.cutlass_form("cutlass", 200, n, k, 132) == 0
        assert all(ext.gemm_cutlass(x, *args, f)[1] == -1 for f in (-1, 2))  # no such form
        try:
            cuda_backend.set_prefill("cutlass")
            y = layer(x)
        finally:
            cuda_backend.set_prefill(None)
        if takes:
            assert torch.equal(y, direct)
        assert rel_err(y, reference64(layer, x, alpha)) < TOL[torch.bfloat16]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                    reason="CUTLASS's mixed-input GEMM is built for sm_90a only")
@pytest.mark.parametrize("m,rows,alpha,density", [(128, "wave", 0.0, 0.0), (128, "small", 0.0, 0.0),
                                                  (600, "wave", 0.0, 0.0), (128, "wave", 1.0, 0.01),
                                                  (128, "wave", 1.0, 0.0), (300, "wave", 0.0, 0.01),
                                                  (128, "ping", 0.0, 0.0), (128, "ping", 1.0, 0.01)])
def test_default_policy_runs_cutlass_where_its_tiles_fill_the_waves(m, rows, alpha, density, monkeypatch):
    """auto: CUTLASS's GEMM for 65-512 tokens with no ortho stream in play where its tiles fill the SMs' waves, in the
    form cutlass_form picks: wave = 128 rows per SM (cooperative 128x128 tiles, one full wave at 128 tokens), ping =
    64 rows per two SMs on a layer of 2^24+ weights (a quarter wave of those, ping-pong 64x128 tiles fill half a wave
    at 128 tokens), small = 1024 rows (dequantize + cuBLAS); the output is the chosen path's bit for bit (the calls
    are counted) and matches float64."""
    monkeypatch.delenv("LIBORTHO_PREFILL", raising=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = {"wave": 128 * sms, "ping": 64 * -(-sms // 2), "small": 1024}[rows]
    k = 256 if rows != "ping" else -(-(1 << 24) // (n * 64)) * 64
    form = cuda_backend.cutlass_form("auto", m, n, k, sms)
    assert form == {"wave": 0 if m <= 512 else None, "ping": 1, "small": None}[rows]
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    layer = make_layer(n, k, 4, 128, False, density, torch.bfloat16, gen)
    layer.alpha = alpha
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    ext = cuda_backend.extension()
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values)
    w = cuda_backend._checked(ext.dequant_merge(x, *args, alpha, 4, 128, n, k))
    dequant = torch.nn.functional.linear(x, w, layer.bias)
    y, calls = with_counted_calls(monkeypatch, ext, lambda: layer(x))
    ortho = alpha != 0 and layer.ortho_nnz > 0
    consulted = form is not None  # the policy's window: then whether CUTLASS can take the call
    expect = consulted and cutlass_built() and not ortho
    assert calls == ["gemm_cutlass_built"] * consulted + (["gemm_cutlass"] if expect else ["dequant_merge"])
    if expect:
        direct = cuda_backend._checked(ext.gemm_cutlass(x, *args, layer.bias, alpha, 4, 128, n, k, form))
        assert torch.equal(y, direct)
    else:
        assert torch.equal(y, dequant)
    assert rel_err(y, reference64(layer, x, alpha)) < TOL[torch.bfloat16]
