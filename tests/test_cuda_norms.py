"""v1's RMSNorm epilogues (libortho.norms: ``libortho::ortho_linear_add_norm``, ``ortho_linear_rms``, ``ortho_glu_rms``
on CUDA) against float64 chains and against the op's product followed by PyTorch (skipped without a GPU; run on the
GPU machine)."""
import random

import pytest
import torch
import torch.nn.functional as F

from libortho import norms
from libortho.ops import cuda as cuda_backend
from libortho.ops.reference import NORM_TILE
from conftest import pdl_env, set_pdl
from test_cuda import TOL, make_layer, poison_allocator, reference64, rel_err
from test_cuda_glu import assert_decodes_alike, compiled_decode, decode_prompt, pair, small_llama

# programmatic dependent launch: compute capability 9.0 or later
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason="no Hopper GPU")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_backend.build(verbose=False), f"CUDA extension failed to build: {cuda_backend._state['error']}"


SHAPES = [(64, 64), (576, 576), (1536, 576), (576, 1536), (4096, 4096), (4096, 11008), (14336, 4096), (12288, 4096)]


def _cases(count=48, seed=5):
    r = random.Random(seed)
    return [(r.choice(SHAPES), r.choice([1, 2, 3, 5, 8, 9, 16]), r.choice([2, 3, 4, 4, 4]), r.choice([32, 64, 128, -1]),
             r.choice([True, False]), r.choice([0.0, 0.01, 0.05]), r.choice([0.0, 0.5, 1.0]),
             r.choice([torch.bfloat16, torch.float16]), r.choice([True, False])) for _ in range(count)]


def _ids(c):
    return "-".join(map(str, c)).replace("torch.", "")


def _inputs(case):
    (n, k), m, bits, gs, sym, density, alpha, dtype, bias = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)
    layer = make_layer(n, k, bits, gs, sym, density, dtype, gen, bias)
    layer.alpha = alpha
    return layer, gen, m, dtype


@pytest.mark.parametrize("case", _cases(), ids=_ids)
def test_add_norm_epilogue_matches_the_product_then_the_eager_steps(case):
    layer, gen, m, dtype = _inputs(case)
    n, k = layer.out_features, layer.in_features
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    res = torch.randn(m, n, generator=gen, device="cuda").to(dtype)
    g = (1 + 0.2 * torch.randn(n, generator=gen, device="cuda")).to(dtype)
    assert cuda_backend.norm_epilogue_takes(x, n, k)
    poison_allocator()
    h, gh, part = norms.add_norm(layer, x, res, g)
    assert h.shape == gh.shape == (m, n) and part.shape == (m, n // NORM_TILE) and part.dtype == torch.float32
    assert rel_err(h, res.double() + reference64(layer, x, layer.alpha)) < TOL[dtype]
    want = res + layer(x)  # the same sums by the kernel without the epilogue, PyTorch's add
    assert ((h.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()
    assert (h == want).float().mean() > 0.99
    assert torch.equal(gh, g * h)  # from the kernel's own h: eager's rounding of g * h
    sums = h.double().square().unflatten(-1, (-1, NORM_TILE)).sum(-1)
    assert torch.allclose(part.double(), sums, rtol=1e-5, atol=1e-6)


def _rms64(layer, gh, part, eps, alpha):
    r = torch.rsqrt(part.double().sum(-1, keepdim=True) / (NORM_TILE * part.shape[-1]) + eps)
    y = r * (gh.double() @ (layer.base_weight().double() + (alpha * layer.ortho().to_dense().double()
                                                             if alpha != 0 and layer.ortho_nnz else 0)).t())
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("case", _cases(count=40, seed=6), ids=_ids)
def test_rms_epilogue_matches_the_float64_chain_and_the_pytorch_path(case):
    layer, gen, m, dtype = _inputs(case)
    k = layer.in_features
    h = (3 * torch.randn(m, k, generator=gen, device="cuda")).to(dtype)
    _, gh, part = norms.carry(h, (1 + 0.2 * torch.randn(k, generator=gen, device="cuda")).to(dtype))
    poison_allocator()
    y = norms.rms_product(layer, gh, part, 1e-5, layer.alpha)
    assert y.shape == (m, layer.out_features) and y.dtype == dtype
    assert rel_err(y, _rms64(layer, gh, part, 1e-5, layer.alpha)) < TOL[dtype]
    x17 = torch.cat([gh, gh[:1].expand(17 - m, -1)]) if m < 17 else gh  # M = 17: the product, then r in PyTorch
    p17 = torch.cat([part, part[:1].expand(17 - m, -1)]) if m < 17 else part
    assert not cuda_backend.norm_epilogue_takes(x17, layer.out_features, k)
    y17 = norms.rms_product(layer, x17, p17, 1e-5, layer.alpha)[:m]
    assert rel_err(y, y17.double()) < TOL[dtype]  # one rounding more on that path


@pytest.mark.parametrize("case", _cases(count=24, seed=7), ids=_ids)
def test_glu_rms_epilogue_matches_the_float64_chain(case):
    (n, k), m, bits, gs, sym, density, alpha, dtype, bias = case
    n = min(n, 7168)  # gate and up: twice the rows
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)
    fused = pair(n, k, bits, gs, sym, density, dtype, gen, bias)
    fused.alpha = alpha
    h = (3 * torch.randn(m, k, generator=gen, device="cuda")).to(dtype)
    # g ~ 4 / sqrt(k): gate and up of order 1, so that silu(gate) * up stays far inside fp16's range (with unit
    # weights at k = 11008 the true products reach fp16's 65504)
    g = ((1 + 0.2 * torch.randn(k, generator=gen, device="cuda")) * 4 / k ** 0.5).to(dtype)
    _, gh, part = norms.carry(h, g)
    poison_allocator()
    y = norms.rms_product(fused, gh, part, 1e-6, alpha)
    assert y.shape == (m, n) and y.dtype == dtype
    want = _rms64(fused, gh, part, 1e-6, alpha).unflatten(-1, (-1, 2, 8))
    want = (F.silu(want[..., 0, :]) * want[..., 1, :]).flatten(-2)
    assert want.abs().max() < torch.finfo(dtype).max / 64  # the test's own premise
    assert rel_err(y, want) < 2 * TOL[dtype]


def norms_model(fused=True):
    """The small random bf16 Llama with norm weights, GLU, fused q/k/v and the attention step op; with ``fused`` its
    norms in the products."""
    from libortho import attention, fuse_glu, fuse_siblings
    model = small_llama(norm_weights=True)
    fuse_glu(model), fuse_siblings(model)
    attention.use_decode_attention(model), attention.use_attention_step(model)
    if fused:
        assert norms.fuse_norms(model) == [0, 1]
    return model


def test_compiled_and_captured_decode_with_the_norms_in_the_products():
    """A small random bf16 Llama decomposed (RTN, 1 %, norms with weights), GLU + fused q/k/v + the step op, compiled
    and captured: with fuse_norms the greedy tokens are those without it (a near-tie may part them late), the logits
    agree to the bf16 level."""
    def change(model):
        assert norms.fuse_norms(model) == [0, 1]
    assert_decodes_alike(norms_model(fused=False), change)


def test_a_configuration_without_a_norm_form_falls_back():
    """With every M <= 8 class of the v1 table on configuration 5 (no norm form, v1_norms.cu), the norm ops take the
    product and PyTorch's steps: the binding says so (kNotTaken), the results stay at the reference level."""
    ext = cuda_backend.extension()
    old = list(ext.v1_table())
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = make_layer(576, 576, 4, 128, True, 0.01, torch.bfloat16, gen, True)
    h = (3 * torch.randn(2, 576, generator=gen, device="cuda")).to(torch.bfloat16)
    _, gh, part = norms.carry(h, torch.ones(576, device="cuda", dtype=torch.bfloat16))
    want = _rms64(layer, gh, part, 1e-5, layer.alpha)
    assert rel_err(norms.rms_product(layer, gh, part, 1e-5, layer.alpha), want) < TOL[torch.bfloat16]
    try:
        # every M <= 8 class (0-4, and 7: grids of fewer row tiles than SMs, as 576 rows are)
        assert ext.set_v1_table([5] * 5 + old[5:7] + [5] + old[8:])
        assert cuda_backend._norm_call(gh, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx,
                                       layer.values, layer.bias, layer.alpha, 4, 128, 576, 576, None, None, part,
                                       1e-5, False, "test") is None
        assert rel_err(norms.rms_product(layer, gh, part, 1e-5, layer.alpha), want) < TOL[torch.bfloat16]
    finally:
        assert ext.set_v1_table(old)


@needs_hopper
@pytest.mark.parametrize("mode,fused", [("0", True), ("1", True), ("first", True), ("late-first", True),
                                        ("first", False), ("default", True)])
def test_compiled_decode_with_the_norms_gives_the_bits_of_plain_launches_under_pdl(monkeypatch, mode, fused):
    """The model of the test above with its norms fused, compiled and captured, three times with $LIBORTHO_PDL at
    `mode`: 32 greedy tokens and their logits bit-identical to plain launches every time (PDL moves only when a kernel
    starts; a difference is a race, not a rounding). Mode "0" is the control: plain launches against themselves (the
    prompt's prefill, M = 20, takes v1's M <= 32 forms; no row limit). `fused` False: the same model with its norms
    apart (inductor's norm kernels between the products), to tell the norm forms from the rest. "default": neither
    variable set ("first" for one-row calls, plain launches for the prefill)."""
    model, ids = norms_model(fused), decode_prompt()

    def run(pdl):
        set_pdl(monkeypatch, pdl)
        return compiled_decode(model, ids)
    tokens, logits = run("0")
    for i in range(3):
        t, lg = run(mode)
        assert torch.equal(t, tokens) and torch.equal(lg, logits), (i, (lg.float() - logits.float()).abs().max())


# One fresh process's compiled decode of the norms model (as above, norms fused): a hash of its tokens and logits.
_FRESH_DECODE = """
import hashlib, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_cuda_glu import compiled_decode, decode_prompt
from test_cuda_norms import norms_model
tokens, logits = compiled_decode(norms_model(), decode_prompt())
raw = tokens.cpu().numpy().tobytes() + logits.view(torch.int16).cpu().numpy().tobytes()
print("BITS", hashlib.sha1(raw).hexdigest())
"""


@needs_hopper
@pytest.mark.parametrize("deterministic", ["0", "1"])
def test_fresh_processes_give_one_set_of_bits_under_pdl(deterministic):
    """The compiled decode above in four fresh processes at once, two with plain launches, one with PDL `first` at
    every M and one with neither variable set (`first` for one-row calls): one set of bits, with inductor as it comes
    and in its deterministic mode. Within one process the PDL test above cannot see a race that only a cold process
    meets (the first calls, lazy allocations, the compile's own launches)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    tests = str(Path(__file__).resolve().parent)
    base = {k: v for k, v in os.environ.items() if k not in ("LIBORTHO_PDL", "LIBORTHO_PDL_MAX_M")}
    modes = ["0", "first", "0", "default"]
    procs = [subprocess.Popen([sys.executable, "-c", _FRESH_DECODE, tests], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "TORCHINDUCTOR_DETERMINISTIC": deterministic, **pdl_env(mode)})
             for mode in modes]
    bits = []
    for mode, p in zip(modes, procs):
        out, err = p.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("BITS ")]
        assert p.returncode == 0 and lines, (mode, err[-2000:])
        bits.append((mode, lines[-1].split()[1][:12]))
    assert len({b for _, b in bits}) == 1, bits
