"""The decode step's attention as one op (``libortho.ops.attention_step``, ``libortho.attention.use_attention_step``):
its reference against transformers' own rotary embedding, cache update and attention, on the CPU; the CUDA kernel's
form against the reference on a GPU."""
import pytest
import torch

import libortho.ops  # noqa: F401  (registers torch.ops.libortho.*)
from libortho import attention
from libortho.eval import bench_decode as bd
from libortho.ops import cuda as cuda_backend
from libortho.ops.attention_step import rope


def test_rope_is_transformers_rotary_embedding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen)
    angle = torch.randn(2, 1, 32, generator=gen)
    cos, sin = torch.cat((angle.cos(), angle.cos()), -1), torch.cat((angle.sin(), angle.sin()), -1)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope(q, cos, sin), q_ref) and torch.equal(rope(k, cos, sin), k_ref)  # float32: the same ops


def step_inputs(b=2, hq=4, hkv=2, length=16, d=64, pos=5, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)
    angle = torch.randn(b, 1, d // 2, generator=gen, device=device)
    cos, sin = (torch.cat((f(angle), f(angle)), -1).to(dtype) for f in (torch.cos, torch.sin))
    mask = (torch.arange(length, device=device) <= pos).view(1, 1, 1, -1).expand(b, 1, 1, length).contiguous()
    return dict(q=rnd(b, hq, 1, d), k_new=rnd(b, hkv, 1, d), v_new=rnd(b, hkv, 1, d), cos=cos, sin=sin,
                k_cache=rnd(b, hkv, length, d), v_cache=rnd(b, hkv, length, d),
                pos=torch.tensor(pos, device=device), mask=mask, scale=d ** -0.5)


def test_the_op_writes_the_rows_and_attends_as_the_separate_steps():
    a = step_inputs()
    k0, v0 = a["k_cache"].clone(), a["v_cache"].clone()
    out = torch.ops.libortho.decode_attention_step(**a)
    k_rot, q_rot = rope(a["k_new"], a["cos"], a["sin"]), rope(a["q"], a["cos"], a["sin"])
    k0[:, :, 5:6], v0[:, :, 5:6] = k_rot, a["v_new"]
    assert torch.equal(a["k_cache"], k0) and torch.equal(a["v_cache"], v0)  # only row 5 changed, to the new rows
    want = torch.ops.libortho.decode_attention(q_rot, k0, v0, a["mask"], a["scale"])
    assert torch.equal(out, want)


def test_positions_past_the_step_are_never_attended():
    """The op is causal at the step: mask None means the causal mask, and a mask letting later positions through
    (rows of a static cache not written yet) does not make them count."""
    a, b = step_inputs(pos=6, seed=3), step_inputs(pos=6, seed=3)
    causal = torch.ops.libortho.decode_attention_step(**dict(a, mask=None))
    assert torch.equal(causal, torch.ops.libortho.decode_attention_step(**b))  # b's mask: positions <= 6
    c = step_inputs(pos=6, seed=3)
    assert torch.equal(causal, torch.ops.libortho.decode_attention_step(**dict(c, mask=torch.ones_like(c["mask"]))))


@pytest.mark.parametrize("change,match", [
    (dict(k_new=torch.zeros(2, 3, 1, 64)), "k_new has shape"),
    (dict(cos=torch.zeros(2, 1, 32)), "cos has shape"),
    (dict(pos=torch.tensor([1, 2])), "pos must be one int64"),
    (dict(pos=torch.tensor(1.0)), "pos must be one int64"),
    (dict(v_new=torch.zeros(2, 2, 1, 64, dtype=torch.float16)), "v_new is torch.float16")])
def test_bad_step_inputs_say_what_is_wrong(change, match):
    a = dict(step_inputs(), **change)
    with pytest.raises(ValueError, match=match):
        torch.ops.libortho.decode_attention_step(**a)


def decode(model, ids, mode, steps=9, causal_only=True):
    dec = bd.StaticDecoder(model, ids.shape[0], steps + 1, ids.shape[1], mode=mode, keep_logits=True, warmup_steps=0)
    dec.cache.causal_only = causal_only  # False: the op gets the model's mask
    dec.prepare(ids)
    dec.prefill(ids)
    dec.decode(steps)
    layer = dec.cache.layers[0]
    return dec.tokens[:, :steps].clone(), dec.logits[:, :steps].clone(), layer.keys.clone(), layer.values.clone()


@pytest.mark.parametrize("mode,causal_only", [("eager", True), ("eager", False), ("compile", True)])
def test_a_model_decodes_the_same_with_the_step_op(mode, causal_only, monkeypatch):
    """The tiny Llama (GQA 4 on 2), float32, shared-length static cache: with the step op every decode step of every
    layer goes through it (counted in eager mode), and the tokens, logits and cache contents equal those of
    transformers' rotary embedding + cache update + LibOrtho's attention in the same mode: bit for bit in eager mode
    (float32: the same operations), to float32 rounding compiled (inductor fuses the separate steps' arithmetic)."""
    torch.manual_seed(0)
    model = bd.random_llama(bd.tiny_config(), torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(3, 256, (2, 12))
    attention.use_decode_attention(model)
    want = decode(model, ids, mode)
    assert attention.use_attention_step(model) == model.config.num_hidden_layers
    calls = []
    real = torch.ops.libortho.decode_attention_step
    if mode == "eager":
        monkeypatch.setattr(torch.ops.libortho, "decode_attention_step",
                            lambda *a: calls.append(1) or real(*a), raising=False)
    from libortho.static_cache import _layer_class
    layer_update = _layer_class().update

    def update(self, key_states, *a, **kw):  # the cache's own update: the prefill only (traced or not)
        assert key_states.shape[-2] > 1, "a decode step went through the cache's update, not the step op"
        return layer_update(self, key_states, *a, **kw)
    monkeypatch.setattr(_layer_class(), "update", update)
    got = decode(model, ids, mode, causal_only=causal_only)
    if mode == "eager":
        assert len(calls) == 9 * model.config.num_hidden_layers
    assert torch.equal(got[0], want[0])  # tokens
    for g, w in zip(got[1:], want[1:]):  # logits, the first layer's K and V
        assert torch.equal(g, w) if mode == "eager" else (g - w).abs().max() < 1e-4
    assert attention.use_attention_step(model, False) == model.config.num_hidden_layers
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_step_op_stays_out_where_it_does_not_apply(monkeypatch):
    """Prefill (several tokens), transformers' own cache (per-layer lengths) and SDPA attention run the layer's own
    forward: the op is never called."""
    torch.manual_seed(1)
    model = bd.random_llama(bd.tiny_config(), torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(3, 256, (1, 6))
    calls = []
    real = torch.ops.libortho.decode_attention_step
    monkeypatch.setattr(torch.ops.libortho, "decode_attention_step", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    attention.use_attention_step(model)  # SDPA still the model's attention
    dec = bd.StaticDecoder(model, 1, 4, 6, mode="eager", keep_logits=True, warmup_steps=0)
    dec.prepare(ids), dec.prefill(ids), dec.decode(3)
    attention.use_decode_attention(model)
    dec = bd.StaticDecoder(model, 1, 4, 6, mode="eager", keep_logits=True, warmup_steps=0, shared_length=False)
    dec.prepare(ids), dec.prefill(ids), dec.decode(3)
    assert calls == []


def test_a_sliding_window_model_keeps_its_window(monkeypatch):
    """The op is causal at the step and knows no window: a Mistral with a 4-token window, prompt 8, keeps transformers'
    sliding cache layers, so the op never takes a step, and greedy decoding equals transformers' own generate."""
    from transformers import MistralConfig

    from libortho.compat import from_config
    cfg = MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, vocab_size=256, sliding_window=4)
    torch.manual_seed(0)
    model = from_config(cfg).float().eval()
    ids = torch.randint(3, 256, (1, 8))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)[:, 8:]
    taken, real = [], attention.step_takes
    monkeypatch.setattr(attention, "step_takes", lambda *a: taken.append(real(*a)) or taken[-1])
    attention.use_decode_attention(model)
    assert attention.use_attention_step(model) == 2
    tokens = decode(model, ids, "eager", steps=5)[0]
    assert taken and not any(taken)
    assert torch.equal(tokens, want[:, :5])


pytestmark_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytestmark_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,d", [(1, 32, 32, 128), (8, 32, 32, 128), (2, 9, 3, 64), (3, 32, 8, 128)])
@pytest.mark.parametrize("pos,length", [(0, 16), (127, 392), (128, 392), (391, 392), (200, 1000)])
@pytest.mark.parametrize("masked", [True, False])
def test_cuda_step_matches_the_reference(dtype, b, hq, hkv, d, pos, length, masked):
    """The kernel's step form against the op's reference: the caches after the call equal the reference's bit for bit
    but for the rotated key row (one rounding of a float32 result either way: at most one unit in the last place),
    the output within the attention's tolerance; outputs poisoned first."""
    assert cuda_backend.build(verbose=False), cuda_backend._state["error"]
    from libortho.ops.attention_step import step_reference
    a = step_inputs(b, hq, hkv, length, d, pos, dtype, "cuda", seed=pos + b)
    if not masked:
        a["mask"] = None  # the causal limit alone (the kernel's own)
    ref = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in a.items()}
    expected = step_reference(**ref)
    junk = torch.empty(64 << 20, dtype=torch.float32, device="cuda").fill_(float("nan"))
    del junk
    out = torch.ops.libortho.decode_attention_step(**a)
    assert torch.isfinite(out).all()
    assert torch.equal(a["v_cache"], ref["v_cache"])
    others = torch.arange(length, device="cuda") != pos
    assert torch.equal(a["k_cache"][:, :, others], ref["k_cache"][:, :, others])
    row, want = a["k_cache"][:, :, pos].float(), ref["k_cache"][:, :, pos].float()
    assert ((row - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()  # one rounding either way: within an ulp
    err = float((out.double() - expected.double()).norm() / expected.double().norm())
    assert err < (6e-3 if dtype == torch.bfloat16 else 1e-3), err


@pytestmark_gpu
def test_cuda_step_op_decodes_a_bf16_model_as_the_separate_steps():
    """A small random Llama in bf16 (head dim 64, GQA 8 on 2), compiled and captured: with the step op the greedy tokens
    are those of LibOrtho's attention with transformers' rotary embedding and cache update, and the logits agree to
    the bf16 level at every step (the rotary rounding may differ by an ulp)."""
    cfg = bd.llama2_7b_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=2, vocab_size=1000)
    model = bd.random_llama(cfg, torch.device("cuda"), seed=4)
    ids = torch.randint(3, 1000, (2, 20), device="cuda")
    attention.use_decode_attention(model)
    torch._dynamo.reset()
    tokens, logits, _, _ = decode(model, ids, "compile", steps=32)
    attention.use_attention_step(model)
    torch._dynamo.reset()
    try:
        tokens_op, logits_op, _, _ = decode(model, ids, "compile", steps=32)
    finally:
        attention.use_attention_step(model, False)
    first = (tokens_op != tokens).any(0).nonzero()
    upto = int(first[0]) if len(first) else tokens.shape[1]
    assert upto >= 16, upto  # a near-tie may part greedy runs late, not early
    diff = (logits_op[:, :upto] - logits[:, :upto]).abs().amax()
    assert diff < 0.05 * logits.abs().max(), diff


def test_the_cuda_dispatch_hands_the_kernel_its_operands(monkeypatch):
    """decode_attention_step_cuda with a stand-in extension: the kernel gets the operands, pos as one element, the
    chunk attention_chunk picks, the one-launch combine and $LIBORTHO_PDL's bits (none for a batch over
    $LIBORTHO_PDL_MAX_M); a head dim the kernel does not take
    runs the reference (the caches written all the same)."""
    from libortho.ops import attention_step
    from libortho.ops.attention import attention_chunk
    calls = []

    class Ext:
        def decode_attention_step(self, q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale, chunk, last,
                                  pdl):
            calls.append((pos.shape, chunk, last, pdl, scale))
            return torch.full((q.shape[0], 1, q.shape[1], q.shape[3]), 3.0, dtype=q.dtype), 0

    monkeypatch.setattr(cuda_backend, "available", lambda: True)
    monkeypatch.setattr(cuda_backend, "extension", lambda: Ext())
    monkeypatch.setattr(cuda_backend, "_sms", lambda device: 132)
    monkeypatch.setenv("LIBORTHO_PDL", "late")
    monkeypatch.delenv("LIBORTHO_PDL_MAX_M", raising=False)
    a = step_inputs(b=1, hq=8, hkv=2, length=392, d=64, pos=9, dtype=torch.bfloat16)
    out = attention_step.decode_attention_step_cuda(**a)
    assert calls == [((1,), attention_chunk(1, 2, 392, 132), True, 3, a["scale"])] and bool((out == 3).all())
    monkeypatch.setenv("LIBORTHO_PDL_MAX_M", "1")  # a batch over it: plain launches
    attention_step.decode_attention_step_cuda(**step_inputs(b=2, hq=8, hkv=2, length=392, d=64, pos=9,
                                                            dtype=torch.bfloat16))
    assert calls[1:] == [((1,), attention_chunk(2, 2, 392, 132), True, 0, a["scale"])]
    calls.clear()
    a = step_inputs(b=1, hq=8, hkv=2, length=40, d=96, pos=9, dtype=torch.bfloat16)
    before = a["v_cache"].clone()
    monkeypatch.setitem(cuda_backend._state, "warned", set())
    with pytest.warns(RuntimeWarning, match="no CUDA decode-attention-step kernel"):
        attention_step.decode_attention_step_cuda(**a)
    assert not calls and torch.equal(a["v_cache"][:, :, 9:10], a["v_new"])
    assert torch.equal(a["v_cache"][:, :, :9], before[:, :, :9])
