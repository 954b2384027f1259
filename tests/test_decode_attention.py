"""libortho::decode_attention (CPU: its reference) and its use in transformers' models (libortho.attention)."""
import math

import pytest
import torch
import torch.nn.functional as F

import libortho.ops  # noqa: F401  (registers torch.ops.libortho.*)
from libortho import attention
from libortho.eval import bench_decode as bd
from libortho.ops.attention import attention_chunk, check_attention_inputs


def sdpa64(q, k, v, mask, scale):
    """torch's SDPA in float64 on the repeated cache heads, in the op's (B, 1, Hq, D) layout."""
    g = q.shape[1] // k.shape[1]
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                         v.double().repeat_interleave(g, 1), attn_mask=m, scale=scale)
    return out.transpose(1, 2)


def make(b, hq, hkv, length, d, mask_kind, gen, dtype=torch.float32):
    q = torch.randn(b, hq, 1, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    if mask_kind is None:
        return q, k, v, None
    heads = hq if mask_kind == "per-head" else 1
    keep = torch.rand(b, heads, 1, length, generator=gen) > 0.4
    keep[..., 0] = True  # every query attends to something
    if mask_kind == "additive":
        return q, k, v, torch.where(keep, torch.randn(keep.shape, generator=gen), float("-inf"))
    return q, k, v, keep


@pytest.mark.parametrize("b,hq,hkv,length,d", [(1, 4, 4, 1, 64), (2, 9, 3, 50, 64), (3, 8, 2, 33, 128),
                                               (1, 32, 8, 392, 128), (2, 6, 1, 17, 96)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "per-head", "additive"])
def test_op_matches_float64_sdpa(b, hq, hkv, length, d, mask_kind):
    gen = torch.Generator().manual_seed(b * 100 + length)
    q, k, v, mask = make(b, hq, hkv, length, d, mask_kind, gen)
    scale = 1 / math.sqrt(d)
    out = torch.ops.libortho.decode_attention(q, k, v, mask, scale)
    assert out.shape == (b, 1, hq, d) and out.dtype == q.dtype
    ref = sdpa64(q, k, v, mask, scale)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6


def test_a_query_whose_positions_are_all_masked_gives_zeros_as_sdpa_does():
    gen = torch.Generator().manual_seed(3)
    q, k, v, _ = make(2, 2, 2, 8, 64, None, gen)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask[1] = False
    out = torch.ops.libortho.decode_attention(q, k, v, mask, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out[0]).all()
    assert torch.equal(sdpa64(q, k, v, mask, 0.125)[1], torch.zeros_like(out[1], dtype=torch.float64))


@pytest.mark.parametrize("change,match", [
    (dict(q=(1, 4, 2, 64)), "one query token"),
    (dict(k=(1, 3, 8, 64), v=(1, 3, 8, 64)), "multiple of the cache's 3 heads"),
    (dict(v=(1, 2, 9, 64)), "must both be"),
    (dict(mask=(1, 1, 1, 7)), "expected \\(B or 1, Hq or 1, 1, L=8\\)"),
    (dict(mask_dtype=torch.int32), "boolean or float32"),
    (dict(kv_dtype=torch.float64), "share a dtype"),
    (dict(scale=0.0), "scale must be positive"),
    (dict(scale=float("nan")), "scale must be positive"),
])
def test_bad_input_gets_a_clear_error(change, match):
    q = torch.randn(*change.get("q", (1, 4, 1, 64)))
    k = torch.randn(*change.get("k", (1, 2, 8, 64)), dtype=change.get("kv_dtype", torch.float32))
    v = torch.randn(*change.get("v", (1, 2, 8, 64)), dtype=change.get("kv_dtype", torch.float32))
    mask = torch.ones(*change.get("mask", (1, 1, 1, 8))).to(change.get("mask_dtype", torch.bool))
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.libortho.decode_attention(q, k, v, mask, change.get("scale", 0.125))


def test_the_fake_implementation_lets_compile_trace_it():
    gen = torch.Generator().manual_seed(5)
    q, k, v, mask = make(2, 6, 2, 20, 64, "bool", gen)
    fn = torch.compile(lambda q, k, v, m: torch.ops.libortho.decode_attention(q, k, v, m, 0.125) * 2, fullgraph=True)
    assert torch.allclose(fn(q, k, v, mask), 2 * torch.ops.libortho.decode_attention(q, k, v, mask, 0.125))


@pytest.mark.parametrize("pdl,limit,batch,bits", [(None, None, 1, 9), (None, None, 2, 0), ("0", None, 1, 0),
                                                  ("late", None, 1, 3), ("late", "none", 2, 3), ("first", "1", 1, 9),
                                                  ("first", "1", 2, 0)])
def test_the_cuda_dispatch_hands_the_kernel_its_chunk(monkeypatch, pdl, limit, batch, bits):
    """decode_attention_cuda (run here with a stand-in extension): the kernel gets the chunk attention_chunk picks for
    the device's SM count (the linears' cached count), the one-launch combine and $LIBORTHO_PDL's mode bits (none for
    a batch over $LIBORTHO_PDL_MAX_M), and its output is returned."""
    from libortho.ops import attention as ops_attention
    from libortho.ops import cuda as cuda_ops
    calls = []

    class Ext:
        def decode_attention(self, q, k, v, mask, scale, chunk, last_block_combines, pdl_bits):
            calls.append((chunk, last_block_combines, scale, pdl_bits))
            return torch.full((q.shape[0], 1, q.shape[1], q.shape[3]), 7.0, dtype=q.dtype), 0

    monkeypatch.setattr(cuda_ops, "available", lambda: True)
    monkeypatch.setattr(cuda_ops, "extension", lambda: Ext())
    monkeypatch.setattr(cuda_ops, "_sms", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # unset: "first", one row
    if pdl is None:
        monkeypatch.delenv("LIBORTHO_PDL", raising=False)
    else:
        monkeypatch.setenv("LIBORTHO_PDL", pdl)
    if limit is None:
        monkeypatch.delenv("LIBORTHO_PDL_MAX_M", raising=False)
    else:
        monkeypatch.setenv("LIBORTHO_PDL_MAX_M", limit)
    gen = torch.Generator().manual_seed(3)
    q, k, v, mask = make(batch, 6, 3, 392, 64, "bool", gen, torch.bfloat16)
    out = ops_attention.decode_attention_cuda(q, k, v, mask, 0.125)
    assert calls == [(attention_chunk(batch, 3, 392, 132), True, 0.125, bits)]
    assert batch != 1 or calls[0][0] == 16
    assert out.shape == (batch, 1, 6, 64) and bool((out == 7).all())


def test_the_cuda_dispatch_runs_the_reference_quietly_when_the_reference_backend_is_chosen(monkeypatch):
    """LIBORTHO_BACKEND=reference (the greedy check's other side): the reference, no warning about a missing kernel;
    a call the kernel does not take (head dim 96) still says so."""
    import warnings
    from libortho.ops import attention as ops_attention
    from libortho.ops import cuda as cuda_ops
    monkeypatch.setitem(cuda_ops._state, "warned", set())
    monkeypatch.setenv("LIBORTHO_BACKEND", "reference")
    gen = torch.Generator().manual_seed(4)
    q, k, v, mask = make(1, 6, 3, 40, 64, "bool", gen, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops_attention.decode_attention_cuda(q, k, v, mask, 0.125)
    assert torch.equal(out, ops_attention.decode_attention_reference(q, k, v, mask, 0.125))
    monkeypatch.setattr(cuda_ops, "available", lambda: True)
    q, k, v, mask = make(1, 4, 4, 40, 96, None, gen, torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no CUDA decode-attention kernel"):
        ops_attention.decode_attention_cuda(q, k, v, mask, 0.1)


def test_chunks_fill_two_waves_where_they_can():
    assert attention_chunk(1, 32, 392, 132) == 32   # 7B shape, batch 1: 416 blocks of 32 positions
    assert attention_chunk(8, 32, 392, 132) == 64
    assert attention_chunk(1, 3, 392, 132) == 16    # SmolLM2: as small as allowed
    with pytest.raises(ValueError):
        check_attention_inputs(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8), None, 1.0)


class Spy:
    """Counts the calls of attention_forward that reach the op and those that fall back to SDPA, and the layer steps
    that the step op takes (use_attention_step)."""

    def __init__(self, monkeypatch):
        from transformers.integrations import sdpa_attention
        self.op = self.sdpa = self.step = 0
        real_op, real_sdpa = attention._decode_attention, sdpa_attention.sdpa_attention_forward
        real_takes = attention.step_takes

        def takes(*a):
            took = real_takes(*a)
            self.step += took
            return took

        def op(*a):
            self.op += 1
            return real_op(*a)

        def sdpa(*a, **kw):
            self.sdpa += 1
            return real_sdpa(*a, **kw)
        monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", sdpa)
        monkeypatch.setattr(attention, "_decode_attention", op)
        monkeypatch.setattr(attention, "step_takes", takes)


def decode(model, ids, mode, steps=9):
    dec = bd.StaticDecoder(model, ids.shape[0], steps + 1, ids.shape[1], mode=mode, keep_logits=True, warmup_steps=0)
    dec.prepare(ids)
    dec.prefill(ids)
    dec.decode(steps)
    return dec.tokens[:, :steps].clone(), dec.logits[:, :steps].clone()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_a_model_decodes_the_same_tokens_with_it(mode, monkeypatch):
    """The tiny Llama (GQA: 4 heads on 2) with a static cache: the decode steps go through the op (counted in eager
    mode), the prefill through SDPA, and the greedy tokens and logits match the model's own SDPA attention."""
    torch.manual_seed(0)
    model = bd.random_llama(bd.tiny_config(), torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(3, 256, (2, 12))
    tokens, logits = decode(model, ids, "eager")
    attention.use_decode_attention(model)
    assert model.config._attn_implementation == "libortho_decode"
    spy = Spy(monkeypatch) if mode == "eager" else None
    tokens_op, logits_op = decode(model, ids, mode)
    if spy:
        layers = model.config.num_hidden_layers
        assert spy.op == 9 * layers, (spy.op, spy.sdpa)  # every decode step of every layer, nothing else
        assert spy.sdpa >= layers  # the prefill
    assert torch.equal(tokens_op, tokens)
    assert (logits_op - logits).abs().max() < 1e-4
    attention.use_decode_attention(model, False)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn", ["libortho", "libortho-step"])
def test_bench_decode_runs_every_row_with_it(tmp_path, attn):
    """--attn libortho (and libortho-step: the step's attention as one op, libortho.ops.attention_step) in every row."""
    import json
    from libortho.cli import main
    out = tmp_path / "d.json"
    main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "2", "--prompt-len", "8",
          "--new-tokens", "6", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--variants", "bf16", "alpha1",
          "--attn", attn, "--check-tokens", "0", "--no-progress", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["protocol"]["attention"] == attn and result["models"]["tiny"]["attention"] == attn
    assert {r["model"] for r in result["rows"]} == {"tiny"}
    assert all(r["bf16_tok_s"] > 0 and r["alpha1_tok_s"] > 0 for r in result["rows"])


def test_generate_cli_takes_it_in_the_fast_path(tmp_path, capsys, monkeypatch):
    """`libortho generate --mode eager --attn libortho`: the same greedy text as SDPA's, with the decode steps through
    the op; without a fast-path mode the option is refused with a message."""
    from libortho.cli import main
    from conftest import char_tokenizer, tiny_model
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    args = [str(d), "--max-new-tokens", "6", "--no-chat", "--prompt", "abc", "--mode", "eager"]
    main(["generate", *args])
    plain = capsys.readouterr().out.splitlines()[-1].split("] ", 1)[1]
    spy = Spy(monkeypatch)
    main(["generate", *args, "--attn", "libortho"])
    assert capsys.readouterr().out.splitlines()[-1].split("] ", 1)[1] == plain
    assert spy.op > 0
    with pytest.raises(SystemExit, match="add --compile or --mode"):
        main(["generate", str(d), "--attn", "libortho"])



def _llama(head_dim, dtype, heads=4, kv_heads=2):
    cfg = bd.tiny_config()
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = heads, kv_heads, head_dim
    return bd.random_llama(cfg, torch.device("cpu"), dtype=dtype)


def test_auto_picks_the_kernel_only_where_it_fits():
    """--attn auto: LibOrtho's attention on CUDA for fp16 / bf16 models with head dim 64 or 128 and at most 8 query heads
    per cache head (what decode_attention.cu takes); SDPA otherwise; an explicit choice is kept."""
    fits = _llama(64, torch.bfloat16)
    assert attention.resolve("auto", fits, "cuda") == "libortho-step"
    assert attention.resolve("auto", _llama(128, torch.float16), torch.device("cuda", 0)) == "libortho-step"
    assert attention.resolve("auto", fits, "cpu") == "sdpa"
    assert attention.resolve("auto", _llama(32, torch.bfloat16), "cuda") == "sdpa"
    assert attention.resolve("auto", _llama(64, torch.float32), "cuda") == "sdpa"
    assert attention.resolve("auto", _llama(64, torch.bfloat16, heads=18, kv_heads=2), "cuda") == "sdpa"
    assert attention.resolve("sdpa", fits, "cuda") == "sdpa"
    assert attention.resolve("libortho", fits, "cpu") == "libortho"


def test_generate_cli_auto_takes_it_where_the_kernel_fits(tmp_path, capsys, monkeypatch):
    """`libortho generate` without --attn: SDPA on the CPU (the op's reference would only be slower), LibOrtho's
    attention step op where the kernel fits (stood in for here), and never outside the fast path (no error either)."""
    from libortho.cli import main
    from conftest import char_tokenizer, tiny_model
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    args = [str(d), "--max-new-tokens", "6", "--no-chat", "--prompt", "abc"]
    spy = Spy(monkeypatch)
    main(["generate", *args, "--mode", "eager"])
    assert spy.op == spy.step == 0
    monkeypatch.setattr(attention, "kernel_fits", lambda model, device: True)
    main(["generate", *args])  # no fast path: SDPA, not a refusal
    assert spy.op == spy.step == 0
    main(["generate", *args, "--mode", "eager"])
    assert spy.step > 0  # the decode steps' layers go through the step op (the prompt through the attention op)


def test_bench_decode_auto_picks_per_model_and_says_so(tmp_path, monkeypatch):
    """--attn auto in bench decode: each model gets what attention.resolve picks for it (recorded with the model); one
    that differs from the header's choice is named under the table."""
    import json
    from libortho.cli import main
    monkeypatch.setattr(attention, "kernel_fits", lambda model, device: True)  # as if the kernel took it
    out = tmp_path / "d.json"
    main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
          "--new-tokens", "4", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--variants", "bf16",
          "--check-tokens", "0", "--no-progress", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["protocol"]["attention"] == "sdpa" and result["models"]["tiny"]["attention"] == "libortho-step"
    assert "Attention of tiny: libortho-step" in out.with_suffix(".md").read_text()
