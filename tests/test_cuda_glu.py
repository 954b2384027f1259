"""v1's GLU epilogue (libortho.glu, ``libortho::ortho_glu`` on CUDA) against the float64 chain and against the op's
product followed by PyTorch's activation (skipped without a GPU; run on the GPU machine)."""
import random

import pytest
import torch
import torch.nn.functional as F

from libortho import glu, quant
from libortho.ops import cuda as cuda_backend
from libortho.sieve import csr_from_indices
from test_cuda import TOL, make_layer, poison_allocator, reference64, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_backend.build(verbose=False), f"CUDA extension failed to build: {cuda_backend._state['error']}"


def pair(n, k, bits, gs, sym, density, dtype, gen, bias, csr=None):
    return glu.OrthoGLU.from_pair(make_layer(n, k, bits, gs, sym, density, dtype, gen, bias, csr),
                                  make_layer(n, k, bits, gs, sym, density, dtype, gen, bias, csr))


def chain64(fused, x, alpha):
    """silu(gate) * up in float64 from the fused layer's own rows (de-interleaved)."""
    y = reference64(fused, x, alpha).unflatten(-1, (-1, 2, glu.ROWS))
    return (F.silu(y[..., 0, :]) * y[..., 1, :]).flatten(-2)


def fallback(fused, x):
    """The op's product by the same kernel without the epilogue, then PyTorch's silu and product."""
    return glu.glu_from_interleaved(torch.ops.libortho.ortho_linear(
        x, fused.qweight, fused.scales, fused.zeros, fused.row_ptr, fused.col_idx, fused.values, fused.bias,
        fused.alpha, fused.bits, quant.effective_group_size(fused.group_size, fused.in_features),
        fused.out_features, fused.in_features))


def _cases(count=48, seed=11):
    r = random.Random(seed)
    shapes = [(8, 64), (24, 576), (136, 256), (520, 1000), (1376, 4096), (5504, 4096), (4096, 2048)]
    return [(r.choice(shapes), r.choice([1, 2, 3, 5, 8, 9, 16]), r.choice([2, 3, 4, 4, 4]), r.choice([32, 64, 128, -1]),
             r.choice([True, False]), r.choice([0.0, 0.01, 0.05]), r.choice([0.0, 0.5, 1.0]),
             r.choice([torch.bfloat16, torch.float16]), r.choice([True, False])) for _ in range(count)]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_glu_epilogue_matches_the_float64_chain_and_the_unfused_product(case):
    (n, k), m, bits, gs, sym, density, alpha, dtype, bias = case
    gen = torch.Generator(device="cuda").manual_seed(hash(case) % 2**31)
    fused = pair(n, k, bits, gs, sym, density, dtype, gen, bias)
    fused.alpha = alpha
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    assert cuda_backend.glu_epilogue_takes(x, fused.out_features, fused.in_features)
    poison_allocator()
    y = fused(x)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, chain64(fused, x, alpha)) < TOL[dtype]
    want = fallback(fused, x)  # the same sums, PyTorch's rounding steps: equal, or an ulp apart where expf differs
    assert ((y.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-6).all()
    assert (y == want).float().mean() > 0.99


@pytest.mark.parametrize("m", [1, 7, 16])
def test_empty_rows_and_one_very_dense_row(m):
    n, k, dtype = 200, 576, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(m)
    dense = torch.zeros(n, k, device="cuda")
    dense[7] = torch.randn(k, generator=gen, device="cuda")
    dense[150, ::3] = torch.randn(192, generator=gen, device="cuda")
    csr = csr_from_indices(dense, torch.nonzero(dense.reshape(-1)).reshape(-1), dtype)
    fused = pair(n, k, 4, 128, True, 0.0, dtype, gen, False, csr)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    for alpha in (0.0, 0.5, 1.0):
        fused.alpha = alpha
        poison_allocator()
        assert rel_err(fused(x), chain64(fused, x, alpha)) < TOL[dtype]


@pytest.mark.parametrize("m", [17, 64, 300])
def test_above_16_rows_the_product_then_the_activation(m):
    gen = torch.Generator(device="cuda").manual_seed(m)
    fused = pair(1376, 4096, 4, 128, True, 0.01, torch.bfloat16, gen, False)
    x = torch.randn(m, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    assert not cuda_backend.glu_epilogue_takes(x, fused.out_features, fused.in_features)
    y, want = fused(x).float(), fallback(fused, x).float()  # the same path twice (the ortho add's atomics may reorder)
    assert ((y - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
    assert rel_err(fused(x), chain64(fused, x, fused.alpha)) < TOL[torch.bfloat16]


def small_llama(norm_weights=False):
    """A small random bf16 Llama on the GPU, decomposed (RTN INT4 g128, 1 %); norm_weights: norms with weights of
    their own (random_llama's are ones)."""
    from libortho import OrthoConfig, decompose
    from libortho.eval import bench_decode as bd
    cfg = bd.llama2_7b_config(hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=2, vocab_size=1000)
    model = bd.random_llama(cfg, torch.device("cuda"), seed=5)
    if norm_weights:  # seeded: the same model in every process (session 43: unseeded, each process built its own)
        gen = torch.Generator(device="cuda").manual_seed(6)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
    decompose(model, OrthoConfig(bits=4, group_size=128, density=0.01, method="rtn", dtype="bfloat16"), progress=False)
    return model


def inductor_deterministic():
    """Inductor without its on-device benchmarking of choices that change numerics (reduction configurations), so
    that a decode's bits cannot depend on one process's timings. A guard, not a found cause: session 42's differing
    bits across processes came from an unseeded model (small_llama's norm weights); seeded, fresh processes give one
    set of bits with inductor as it comes too (test_cuda_norms)."""
    import contextlib

    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config, "deterministic"):
        return contextlib.nullcontext()
    return inductor_config.patch(deterministic=True)


def decode_prompt():
    """The decode tests' prompt: 20 seeded token ids, batch 1."""
    return torch.randint(3, 1000, (1, 20), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))


def compiled_decode(model, ids):
    """32 greedy tokens after ``ids`` and their logits, ``model``'s step compiled (from a fresh dynamo) and captured."""
    from libortho.eval import bench_decode as bd
    torch._dynamo.reset()
    dec = bd.StaticDecoder(model, 1, 33, ids.shape[1], mode="compile", keep_logits=True)
    dec.prepare(ids), dec.prefill(ids), dec.decode(32)
    return dec.tokens[:, :32].clone(), dec.logits[:, :32].clone()


def assert_decodes_alike(model, change):
    """32 greedy tokens compiled and captured before and after ``change(model)``: the same tokens (a near-tie may part
    them late, not before 16) and logits that agree to the bf16 level up to where they part. Compiled under inductor's
    deterministic mode (inductor_deterministic)."""
    ids = decode_prompt()

    def run():
        with inductor_deterministic():
            tokens, logits = compiled_decode(model, ids)
        return tokens, logits.float()
    tokens, logits = run()
    change(model)
    tokens_2, logits_2 = run()
    first = (tokens_2 != tokens).any(0).nonzero()
    upto = int(first[0]) if len(first) else tokens.shape[1]
    assert upto >= 16, upto
    assert (logits_2[:, :upto] - logits[:, :upto]).abs().max() < 0.25


def test_compiled_and_captured_decode_with_glu():
    """A small random bf16 Llama decomposed (RTN, 1 %), compiled and captured: with gate / up as one GLU layer the
    greedy tokens are those without it (a near-tie may part them late) and the logits agree to the bf16 level."""
    from libortho import fuse_siblings

    def change(model):
        assert glu.fuse_glu(model) and fuse_siblings(model)
    assert_decodes_alike(small_llama(), change)
