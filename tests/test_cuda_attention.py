"""decode_attention.cu against a float64 reference (GPU only): shapes, grouped heads, masks, layouts, chunks."""
import math

import pytest
import torch

import libortho.ops  # noqa: F401
from libortho import attention
from libortho.eval import bench_decode as bd
from libortho.ops import cuda as cuda_backend
from libortho.ops.attention import kernel_takes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 6e-3, torch.float16: 1e-3}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_backend.build(verbose=False), f"CUDA extension failed to build: {cuda_backend._state['error']}"


def poison_allocator():
    junk = torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    del junk


def reference64(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, -1)
    p = torch.where(torch.isneginf(s).all(-1, keepdim=True), 0.0, p)
    return (p @ v.double().repeat_interleave(g, 1)).transpose(1, 2)


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned elements)"
    return float((y.double() - ref).norm() / ref.norm())


def cache(b, hq, hkv, length, d, dtype, gen, q_like_transformers=True):
    """q as transformers hands it over ((B, 1, Hq, D) projected, viewed as (B, Hq, 1, D)), k and v a static cache."""
    q = torch.randn(b, 1, hq, d, generator=gen, device="cuda").to(dtype)
    q = q.transpose(1, 2) if q_like_transformers else q.transpose(1, 2).contiguous()
    k = torch.randn(b, hkv, length, d, generator=gen, device="cuda").to(dtype)
    v = torch.randn(b, hkv, length, d, generator=gen, device="cuda").to(dtype)
    return q, k, v


def filled_mask(b, length, gen, heads=1):
    """Each sequence attends to its first n positions (a static cache filled up to n), n random per row and head."""
    n = torch.randint(1, length + 1, (b, heads, 1, 1), generator=gen, device="cuda")
    return torch.arange(length, device="cuda").view(1, 1, 1, -1) < n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,hq,hkv", [(1, 32, 32), (2, 9, 3), (3, 32, 8), (1, 8, 1), (4, 16, 2), (1, 7, 7)])
@pytest.mark.parametrize("length", [1, 5, 64, 65, 392, 1000])
def test_kernel_matches_float64_with_a_filled_prefix_mask(dtype, d, b, hq, hkv, length):
    gen = torch.Generator(device="cuda").manual_seed(length * 7 + b + hq)
    q, k, v = cache(b, hq, hkv, length, d, dtype, gen)
    mask = filled_mask(b, length, gen)
    assert kernel_takes(q, k, v)
    poison_allocator()
    out = torch.ops.libortho.decode_attention(q, k, v, mask, 1 / math.sqrt(d))
    assert out.shape == (b, 1, hq, d) and out.is_contiguous()
    assert rel_err(out, reference64(q, k, v, mask, 1 / math.sqrt(d))) < TOL[dtype]


@pytest.mark.parametrize("mask_kind", ["none", "random", "per-head", "additive-f32", "additive-bf16", "batch-1"])
@pytest.mark.parametrize("chunk", [16, 32, 64, 128])
@pytest.mark.parametrize("one_launch", [True, False])
def test_kernel_masks_and_chunks(mask_kind, chunk, one_launch):
    gen = torch.Generator(device="cuda").manual_seed(chunk)
    b, hq, hkv, length, d = 3, 12, 4, 300, 128
    q, k, v = cache(b, hq, hkv, length, d, torch.bfloat16, gen, q_like_transformers=False)
    keep = torch.rand(b, 1, 1, length, generator=gen, device="cuda") > 0.7
    keep[..., 5] = True
    keep[0, ..., 100:] = False  # whole chunks excluded for one sequence
    mask = {"none": None, "random": keep, "per-head": filled_mask(b, length, gen, heads=hq),
            "additive-f32": torch.where(keep, torch.randn(keep.shape, generator=gen, device="cuda"), float("-inf")),
            "additive-bf16": torch.where(keep, torch.randn(keep.shape, generator=gen, device="cuda"),
                                         float("-inf")).bfloat16(),
            "batch-1": keep[:1]}[mask_kind]
    ext = cuda_backend.extension()
    poison_allocator()
    out = cuda_backend._checked(ext.decode_attention(q, k, v, mask, 0.1, chunk, one_launch, 0),
                               "decode attention")
    assert rel_err(out, reference64(q, k, v, mask, 0.1)) < TOL[torch.bfloat16]


def test_one_launch_results_hold_after_the_ticket_ring_wraps():
    """Each call takes B * Hkv tickets of a ring of 2**19, and its last blocks put them back to 0: after more calls
    than the ring holds, a ticket left non-zero would leave heads unwritten (poisoned) or combined early."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = cache(64, 16, 8, 96, 64, torch.bfloat16, gen)
    mask = filled_mask(64, 96, gen)
    ext = cuda_backend.extension()
    first = cuda_backend._checked(ext.decode_attention(q, k, v, mask, 0.125, 16, True, 0), "decode attention")
    assert rel_err(first, reference64(q, k, v, mask, 0.125)) < TOL[torch.bfloat16]
    for _ in range(2**19 // (64 * 8) + 7):
        ext.decode_attention(q, k, v, mask, 0.125, 16, True, 0)
    poison_allocator()
    again = cuda_backend._checked(ext.decode_attention(q, k, v, mask, 0.125, 16, True, 0), "decode attention")
    assert torch.equal(again, first)


def test_rows_with_no_position_give_zeros_and_repeat_bit_for_bit():
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = cache(2, 8, 2, 200, 64, torch.bfloat16, gen)
    mask = filled_mask(2, 200, gen)
    mask[1] = False
    out = torch.ops.libortho.decode_attention(q, k, v, mask, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out[:1], reference64(q[:1], k[:1], v[:1], mask[:1], 0.125)) < TOL[torch.bfloat16]
    poison_allocator()
    assert torch.equal(out, torch.ops.libortho.decode_attention(q, k, v, mask, 0.125))


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "additive-bf16"])
def test_what_excluded_positions_hold_never_reaches_the_output(b, mask_kind):
    """Positions no head attends may hold anything (NaN, inf: an unwritten cache); batch 1 requests their K and V rows
    with the mask (kernel_spec), batch > 1 skips them: either way the output is bit for bit that of a clean cache."""
    gen = torch.Generator(device="cuda").manual_seed(5 + b)
    q, k, v = cache(b, 32, 8, 392, 128, torch.bfloat16, gen)
    keep = filled_mask(b, 392, gen)
    keep[..., 7] = False  # a hole inside the filled part too
    mask = keep if mask_kind == "bool" else torch.where(keep, 0.0, float("-inf")).bfloat16()
    bad_k, bad_v = k.clone(), v.clone()
    hidden = ~keep[:, 0, 0, :]  # (B, L)
    bad_k.permute(0, 2, 1, 3)[hidden] = float("nan")
    bad_v.permute(0, 2, 1, 3)[hidden] = float("inf")
    clean = torch.ops.libortho.decode_attention(q, k, v, mask, 0.088)
    assert rel_err(clean, reference64(q, k, v, keep, 0.088)) < TOL[torch.bfloat16]
    poison_allocator()
    assert torch.equal(torch.ops.libortho.decode_attention(q, bad_k, bad_v, mask, 0.088), clean)


def test_a_cuda_graph_replays_it_with_the_mask_of_the_step():
    """The static-cache use: the mask changes in place between replays (more positions filled)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = cache(1, 32, 32, 392, 128, torch.bfloat16, gen)
    n = torch.tensor(128, device="cuda")
    mask = (torch.arange(392, device="cuda") < n).view(1, 1, 1, -1)
    torch.ops.libortho.decode_attention(q, k, v, mask, 0.088)  # warm-up outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.libortho.decode_attention(q, k, v, mask, 0.088)
    for filled in (128, 129, 200, 392):
        mask.copy_((torch.arange(392, device="cuda") < filled).view(1, 1, 1, -1))
        g.replay()
        assert rel_err(out, reference64(q, k, v, mask, 0.088)) < TOL[torch.bfloat16], filled


def test_calls_the_kernel_does_not_take_run_the_reference():
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = cache(1, 4, 4, 40, 96, torch.bfloat16, gen)  # head dim 96
    assert not kernel_takes(q, k, v)
    with pytest.warns(RuntimeWarning, match="no CUDA decode-attention kernel"):
        out = torch.ops.libortho.decode_attention(q, k, v, None, 0.1)
    assert rel_err(out, reference64(q, k, v, None, 0.1)) < TOL[torch.bfloat16]
    q, k, v = cache(1, 18, 2, 40, 64, torch.bfloat16, gen)  # 9 query heads per cache head
    assert not kernel_takes(q, k, v)


@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_a_bf16_model_decodes_with_it_as_with_sdpa(mode):
    """A small random Llama in bf16 on the GPU (GQA 8 on 2, head dim 64): SDPA decodes greedily; the same model with
    LibOrtho's decode attention is fed SDPA's tokens (teacher-forced, so both see one history at every step, where a
    random model's near-ties would let free greedy runs part at a rounding) and its logits agree at all 32 steps."""
    cfg = bd.llama2_7b_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=2, vocab_size=1000)
    model = bd.random_llama(cfg, torch.device("cuda"), seed=4)
    ids = torch.randint(3, 1000, (2, 20), device="cuda")

    def run(forced=None):
        dec = ForcedDecoder(model, 2, 33, 20, mode=mode, keep_logits=True, forced=forced)
        dec.prepare(ids)
        dec.prefill(ids)
        dec.decode(32)
        return dec.tokens[:, :33].clone(), dec.logits[:, :33].clone()
    tokens, logits = run()
    attention.use_decode_attention(model)
    try:
        tokens_op, logits_op = run(forced=tokens)
    finally:
        attention.use_decode_attention(model, False)
    assert torch.equal(tokens_op, tokens)  # the forcing took hold
    diff = (logits_op - logits).abs().amax(dim=(0, 2))  # per step
    assert (diff < 0.05 * logits.abs().max()).all(), diff
    agree = (logits_op.argmax(-1) == tokens).float().mean().item()
    assert agree > 0.9, agree  # the op's own choices: SDPA's but for near-ties


class ForcedDecoder(bd.StaticDecoder):
    """StaticDecoder whose next token is taken from ``forced`` (B, n) at the step's position (device side, so graphs
    and compile keep it); the argmax is still what the logits say."""

    def __init__(self, *args, forced=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.forced = forced

    def _write(self, logits):
        if self.forced is None:
            return super()._write(logits)
        nxt = self.forced.index_select(1, self.pos)
        self.tokens.index_copy_(1, self.pos, nxt)
        self.logits.index_copy_(1, self.pos, logits.float()[:, None])
        self.cur.copy_(nxt)
        self.pos.add_(1)
