"""The decode harness of ``libortho bench decode`` (and ``libortho generate --compile``) on tiny models."""
import json
import operator
import re

import pytest
import torch
from conftest import char_tokenizer, set_pdl, tiny_model

import libortho
from libortho.cli import main
from libortho.eval import bench_decode as bd

CUDA = torch.cuda.is_available()


def _prompts(batch, length, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _decomposed(seed=0, density=0.05):
    model = tiny_model("llama", seed)
    libortho.decompose(model, libortho.OrthoConfig(bits=4, group_size=32, density=density), progress=False)
    return model


def _hf_greedy(model, ids, n):
    from transformers import GenerationConfig
    # plain greedy: no EOS (no stop, and no min_new_tokens processor masking it), no other processors
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # generate() merges the model's own config in
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    finally:
        model.generation_config.eos_token_id = saved
    assert out.shape[1] == ids.shape[1] + n
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("decomposed", [False, True])
def test_static_decoder_matches_hf_generate(decomposed, one_thread):
    model = _decomposed() if decomposed else tiny_model("llama")
    ids = _prompts(3, 9)
    dec = bd.StaticDecoder(model, batch=3, max_new_tokens=12, prompt_len=9, mode="eager")
    toks = dec.generate(ids)
    assert toks.shape == (3, 12)
    assert torch.equal(toks, _hf_greedy(model, ids, 12))
    # a second generate on the same decoder (cache reset in place) gives the same tokens, also when shorter
    assert torch.equal(dec.generate(ids, 5), toks[:, :5])


def test_decoder_alpha_changes_tokens_and_prefill_is_checked(one_thread):
    model = _decomposed(density=0.2)
    ids = _prompts(2, 8, seed=3)
    with libortho.alpha(model, 0.0):
        t0 = bd.StaticDecoder(model, 2, 10, 8).generate(ids)
        assert torch.equal(t0, _hf_greedy(model, ids, 10))
    t1 = bd.StaticDecoder(model, 2, 10, 8).generate(ids)
    assert torch.equal(t1, _hf_greedy(model, ids, 10))
    dec = bd.StaticDecoder(model, 2, 10, 8)
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(_prompts(2, 9))
    with pytest.raises(ValueError, match="at most 9 decode steps"):
        dec.prefill(ids)
        dec.decode(10)
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            bd.StaticDecoder(model, 2, 10, 8, mode="graph")


def test_torch_compile_fullgraph_of_decomposed_model_cpu():
    """torch.compile(fullgraph=True) of the whole decode step (HF forward, static cache, the libortho op
    through its fake implementation, reference backend at run time): no graph break, same tokens."""
    torch._dynamo.reset()
    model = _decomposed(seed=1)
    ids = _prompts(2, 6, seed=1)
    eager = bd.StaticDecoder(model, 2, 8, 6, mode="eager").generate(ids)
    compiled = bd.StaticDecoder(model, 2, 8, 6, mode="compile").generate(ids)
    assert torch.equal(eager, compiled)
    libortho.fuse_siblings(model)  # q/k/v and gate/up as one op each: the hand-over traces without a break
    torch._dynamo.reset()
    assert torch.equal(bd.StaticDecoder(model, 2, 8, 6, mode="compile").generate(ids), eager)


def test_generate_fast_cuts_at_eos(one_thread):
    model = tiny_model("llama")
    ids = _prompts(1, 5)
    toks = bd.StaticDecoder(model, 1, 8, 5).generate(ids)[0]
    eos = int(toks[3])
    out = bd.generate_fast(model, ids, 8, eos_token_id=eos)[0]
    first = toks.tolist().index(eos)
    assert out.tolist() == toks[: first + 1].tolist()
    assert bd.generate_fast(model, ids, 8, eos_token_id=None)[0].tolist() == toks.tolist()


def test_compare_greedy_schema(one_thread):
    model = _decomposed()
    c = bd.compare_greedy(model, _prompts(1, 7), 6, "eager")
    # on the CPU both sides run the reference op: identical, with the logits equal
    assert c["identical"] is True and c["first_divergence"] is None
    assert c["max_abs_logit_diff"] == 0.0 and c["max_abs_logit"] > 0
    assert len(c["tokens_dispatch"]) == 6 and c["tokens_dispatch"] == c["tokens_reference"]
    assert c["dispatch_mode"] == c["reference_mode"] == "eager"


def _int4_ref(w, x, group_size):
    q, scale, zero = bd.tinygemm_quantize(w, group_size)
    n, k = w.shape
    deq = ((q.reshape(n, k // group_size, group_size).float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k)
    return x.float() @ deq.t(), deq


def _int4_available(device):
    try:
        bd.Int4WeightOnlyLinear.from_weight(torch.randn(16, 64, device=device), group_size=32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
@pytest.mark.parametrize("n,k,g", [(64, 256, 128), (48, 576, 128), (192, 1536, 64)])
def test_int4_wrapper_matches_dense_reference(device, n, k, g):
    if not _int4_available(device):
        pytest.skip(f"torch's int4 weight-only kernel is not available on {device} in this build")
    gen = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
    lin = bd.Int4WeightOnlyLinear.from_weight(w.to(device), group_size=g)
    gs = lin.group_size
    assert k % gs == 0 and gs <= g  # 576 is not a multiple of 128: a smaller group that divides K
    ref, deq = _int4_ref(w, x, gs)
    y = lin(x.to(device)).float().cpu()
    assert y.shape == (5, n)
    # quantization itself is within half a step of each weight
    assert (deq - w).abs().max() <= 0.51 * (w.abs().max() * 2 / 15) + 1e-3
    # the kernel computes x @ deq^T up to bf16 rounding of the output
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max() + 1e-3
    assert lin.storage_bytes() < n * k * 2 / 3  # about 4.25 bits per weight


def test_bench_decode_cli_json_schema(tmp_path, capsys):
    out = tmp_path / "decode-cpu.json"
    main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "2", "--prompt-len", "8",
          "--new-tokens", "5", "--prefill-len", "16", "--reps", "1", "--warmup", "0", "--no-progress",
          "--strict", "--out", str(out)])
    res = json.loads(out.read_text())
    assert {"card", "torch", "date", "rows", "models", "protocol"} <= set(res)
    assert res["protocol"]["attention"] == "sdpa"  # --attn auto on the CPU
    assert [(r["model"], r["batch"]) for r in res["rows"]] == [("tiny", 1), ("tiny", 2)]
    for r in res["rows"]:
        for v in bd.DEFAULT_VARIANTS:
            assert r[f"{v}_tok_s"] > 0 and r[f"{v}_ms_per_token"] > 0, (v, r)
            assert r[f"{v}_deterministic"] is True
        assert r["speedup_alpha1"] == pytest.approx(r["alpha1_tok_s"] / r["bf16_tok_s"])
        assert r["decode_steps"] == 4
    assert res["rows"][0]["bf16_prefill_16_ms"] > 0
    info = res["models"]["tiny"]
    assert info["errors"] == {}
    for v in bd.DEFAULT_VARIANTS:  # one rep, no warm-up: the median is that rep
        assert info["prefill"][f"{v}_ms_all"] == [info["prefill"][f"{v}_ms"]]
    wb = info["weight_bytes"]
    assert wb["libortho_base_only"] < wb["libortho"] < wb["bf16"] and wb["int4"] < wb["bf16"]
    assert info["libortho_config"]["density"] == 0.01 and info["libortho_ortho_nnz"] > 0
    assert info["fused_groups"] == 2 and res["protocol"]["fuse_siblings"] is True  # q/k/v per block
    assert info["glu_layers"] == 2 and res["protocol"]["glu"] is True  # gate/up per block: one GLU layer
    md = out.with_suffix(".md").read_text()
    assert "| tiny | 1 |" in md and "| tiny | 2 |" in md
    assert not (tmp_path / "decode-cpu.partial.json").exists()  # removed once the full result is written
    printed = capsys.readouterr().out
    assert re.search(r"batch 1: +[0-9.]+ tok/s +[0-9.]+ ms/token", printed)
    # separate invocations (one per model) merge into one result
    other = json.loads(out.read_text())
    other["rows"] = [dict(r, model="tiny2") for r in other["rows"]]
    other["models"] = {"tiny2": other["models"]["tiny"]}
    (tmp_path / "b.json").write_text(json.dumps(other))
    main(["bench", "decode", "--merge", str(out), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [r["model"] for r in merged["rows"]] == ["tiny", "tiny", "tiny2", "tiny2"]
    assert set(merged["models"]) == {"tiny", "tiny2"} and "| tiny2 | 2 |" in (tmp_path / "m.md").read_text()
    # rows of another mode (another run): each row then names its mode, the header every run's date
    other["rows"] = [dict(r, model="tiny2", mode="compile") for r in other["rows"]]
    other["date"] = "2026-01-02T00:00:00+00:00"
    (tmp_path / "c.json").write_text(json.dumps(other))
    main(["bench", "decode", "--merge", str(out), str(tmp_path / "c.json"), "--out", str(tmp_path / "mc.json")])
    md = (tmp_path / "mc.md").read_text()
    assert "| tiny (eager) | 1 |" in md and "| tiny2 (compile) | 2 |" in md and "mode per row" in md
    assert "2026-01-02T00:00:00+00:00" in md.splitlines()[0] and res["date"] in md.splitlines()[0]
    # results of another attention are refused (the header names one), and nothing is written
    other["protocol"] = dict(other["protocol"], attention="libortho")
    (tmp_path / "d.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"different attention settings"):
        main(["bench", "decode", "--merge", str(out), str(tmp_path / "d.json"), "--out", str(tmp_path / "ma.json")])
    assert not (tmp_path / "ma.json").exists()
    # the same (model, batch, mode) from two results is refused, and nothing is written
    with pytest.raises(SystemExit, match=r"appear in more than one result"):
        main(["bench", "decode", "--merge", str(out), str(out), "--out", str(tmp_path / "dup.json")])
    assert not (tmp_path / "dup.json").exists()


@pytest.mark.parametrize("flag,key,option,word", [
    ("--coordinate-descent", "coordinate_descent", "coordinate_descent_tuning", "coordinate-descent"),
    ("--inductor-pdl", "inductor_pdl", "triton.enable_pdl", "inductor PDL")])
def test_inductor_options_are_on_while_the_rows_compile_and_recorded(tmp_path, monkeypatch, flag, key, option, word):
    """--coordinate-descent / --inductor-pdl: the inductor option is on while a model's rows run (when their steps
    compile) and off again after, and the protocol and the header say so; without the flag it stays off."""
    import torch._inductor.config as inductor_config
    get = lambda: operator.attrgetter(option)(inductor_config)  # noqa: E731
    seen, bench_model = [], bd.bench_model

    def spy(*a, **k):
        seen.append(get())
        return bench_model(*a, **k)
    monkeypatch.setattr(bd, "bench_model", spy)
    args = ["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
            "--new-tokens", "3", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--no-progress", "--strict",
            "--variants", "bf16"]
    for flags, on in (([], False), ([flag], True)):
        out = tmp_path / f"decode-{on}.json"
        main([*args, *flags, "--out", str(out)])
        assert json.loads(out.read_text())["protocol"][key] is on
        assert (word in out.with_suffix(".md").read_text().splitlines()[0]) is on
        assert seen[-1] is on and get() is False


def test_bench_decode_fused_bf16_control(tmp_path, capsys):
    out = tmp_path / "decode-cpu.json"
    main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
          "--new-tokens", "5", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--no-progress", "--strict",
          "--variants", "bf16", "bf16_fused", "alpha0", "--out", str(out)])
    r = json.loads(out.read_text())["rows"][0]
    assert r["bf16_fused_tok_s"] > 0 and r["alpha1_tok_s"] is None
    assert r["speedup_alpha0_vs_bf16_fused"] == pytest.approx(r["alpha0_tok_s"] / r["bf16_fused_tok_s"])
    assert r["bf16_fused_tokens_matching_bf16_prefix"] == 5  # the same model: the same greedy tokens
    assert "Control, tiny batch 1: bf16 with q/k/v and gate/up fused" in out.with_suffix(".md").read_text()


def test_generate_cli_fast_path_matches_plain(tmp_path, capsys, monkeypatch):
    """The fast path (gate / up as one GLU layer, q / k / v fused) generates the plain path's text."""
    import libortho
    glu_mlps, fuse_glu = [], libortho.fuse_glu
    monkeypatch.setattr(libortho, "fuse_glu", lambda model: glu_mlps.extend(fuse_glu(model)) or glu_mlps)
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    out = tmp_path / "dec"
    main(["decompose", str(d), "--out", str(out), "--group-size", "32", "--density", "0.05"])
    capsys.readouterr()
    args = [str(out), "--alpha", "1", "0", "--max-new-tokens", "6", "--no-chat", "--prompt", "abc"]
    main(["generate", *args])
    plain = [ln.split("] ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[alpha=")]
    main(["generate", *args, "--mode", "eager"])
    fast = [ln.split("] ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[alpha=")]
    assert len(plain) == 2 and fast == plain
    assert len(glu_mlps) == 2  # both of the tiny model's MLPs ran as GLU layers


def test_generate_cli_inductor_pdl_is_on_while_the_fast_path_runs(tmp_path, capsys, monkeypatch):
    """generate --compile --inductor-pdl: inductor's PDL is on while each alpha's step compiles and runs, off after;
    without the flag inductor's setting is left as it is; without --compile the flag is refused before any load."""
    import torch._inductor.config as inductor_config

    import libortho
    from libortho import cli
    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no triton.enable_pdl")
    seen = []
    monkeypatch.setattr(cli, "_generate_fast", lambda *a, **k: seen.append(inductor_config.triton.enable_pdl) or "x")
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    args = [str(d), "--alpha", "1", "0", "--max-new-tokens", "2", "--no-chat", "--compile", "--device", "cpu"]
    main(["generate", *args, "--inductor-pdl"])
    assert seen == [True, True] and inductor_config.triton.enable_pdl is False
    main(["generate", *args])
    assert seen[2:] == [False, False]

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(libortho, "load_model", no_load)
    with pytest.raises(SystemExit, match="add --compile"):
        main(["generate", str(d), "--inductor-pdl"])


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_decode_step_never_syncs_and_graph_matches_eager():
    model = _decomposed().to("cuda", torch.bfloat16)
    ids = _prompts(2, 8).cuda()
    dec = bd.StaticDecoder(model, 2, 12, 8, mode="eager")
    eager = dec.generate(ids)
    dec.prefill(ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronization in a step raises
    try:
        dec.decode(6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(dec.tokens[:, :7], eager[:, :7])
    # every OrthoLinear goes through the CUDA kernels (the fused one at batch 2), once per step
    from libortho.ops import cuda as ocuda
    assert ocuda.available()
    calls = []

    class Counting:
        def __init__(self, ext):
            self.ext = ext

        def __getattr__(self, name):
            fn = getattr(self.ext, name)
            return lambda *a, **k: (calls.append(name), fn(*a, **k))[1]

    ext = ocuda._state["ext"]
    ocuda._state["ext"] = Counting(ext)
    try:
        dec.prefill(ids)
        calls.clear()
        dec.decode(3)
        torch.cuda.synchronize()
    finally:
        ocuda._state["ext"] = ext
    assert calls == ["fused_small_m"] * (3 * len(libortho.ortho_layers(model)))
    for a in (1.0, 0.0):
        with libortho.alpha(model, a):
            e = bd.StaticDecoder(model, 2, 12, 8, mode="eager").generate(ids)
            g = bd.StaticDecoder(model, 2, 12, 8, mode="graph").generate(ids)
            assert torch.equal(e, g), a


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="no Hopper GPU")
@pytest.mark.parametrize("libortho_pdl", ["0", "1", "late", "late-noprefetch", "first", "late-first", "first-noxt",
                                          "default"])
def test_cuda_compiled_step_with_pdl_gives_the_same_bits(monkeypatch, libortho_pdl):
    """--inductor-pdl (Triton kernels launched with programmatic dependent launch), with LibOrtho's own in each
    $LIBORTHO_PDL mode (v1 and the decode attention): every kernel may start while the one before it drains and waits on
    the device before it reads that kernel's output. A decomposed model (head dim 64, so LibOrtho's attention kernel
    runs) decoded by a compiled, captured step gives the tokens and bit-identical logits of plain launches, at alpha 1
    and 0. Every M under PDL ($LIBORTHO_PDL_MAX_M none; batch 2), or "default": neither variable set ("first" for
    one-row calls)."""
    import torch._inductor.config as inductor_config

    from libortho import attention
    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no triton.enable_pdl")
    cfg = bd.llama2_7b_config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=1000)
    model = bd.random_llama(cfg, torch.device("cpu"), dtype=torch.float32, seed=6)
    libortho.decompose(model, libortho.OrthoConfig(bits=4, group_size=128, density=0.02), progress=False)
    model = model.to("cuda", torch.bfloat16)
    attention.use_decode_attention(model)
    ids = torch.randint(3, 1000, (2, 8), device="cuda")

    def run(inductor_pdl, mode):
        set_pdl(monkeypatch, mode)
        torch._dynamo.reset()
        with bd.inductor_tuning(False, inductor_pdl):
            dec = bd.StaticDecoder(model, 2, 16, 8, mode="compile", keep_logits=True)
            return dec.generate(ids), dec.step_logits(16).clone()

    for a in (1.0, 0.0):
        with libortho.alpha(model, a):
            tokens, logits = run(False, "0")
            t, lg = run(True, libortho_pdl)
            assert torch.equal(t, tokens) and torch.equal(lg, logits), (a, libortho_pdl)


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_generate_cli_with_inductor_pdl_writes_the_same_text(tmp_path, capsys):
    """libortho generate --compile on a GPU, with and without --inductor-pdl: the same greedy text at alpha 1 and 0."""
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip("this torch's inductor has no triton.enable_pdl")
    d, out = tmp_path / "tiny", tmp_path / "dec"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    main(["decompose", str(d), "--out", str(out), "--group-size", "32", "--density", "0.05"])
    args = [str(out), "--alpha", "1", "0", "--max-new-tokens", "12", "--no-chat", "--prompt", "abc", "--compile"]
    texts = []
    for flags in ([], ["--inductor-pdl"]):
        capsys.readouterr()
        torch._dynamo.reset()
        main(["generate", *args, *flags])
        texts.append([ln.split("] ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("[alpha=")])
    assert len(texts[0]) == 2 and texts[1] == texts[0]


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_measured_decodes_leave_no_memory_behind():
    """Each measured decode makes cuBLAS keep a workspace (32 MiB on an H200) on the streams it ran on (warm-up,
    capture): unless _free clears them, every later row's peak counts the earlier rows' workspaces."""
    model = _decomposed().to("cuda", torch.bfloat16)
    ids = _prompts(1, 8)
    bd._free("cuda")
    resident = torch.cuda.memory_allocated()
    peaks, after = [], []
    for _ in range(3):
        peaks.append(bd.measure_decode(model, ids, 6, "graph", reps=1, warmup=0, progress=False)["peak_mem_bytes"])
        after.append(torch.cuda.memory_allocated())
    assert after[0] - resident < 2**20  # a first call's small caches (8 KiB seen), not a 32 MiB workspace
    assert after[1] == after[2] == after[0] and peaks[1] == peaks[2]


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_repeated_fast_generates_do_not_grow_memory():
    """Without _free between them (as a program calling generate_fast again and again): the warm-up before each
    capture runs on one side stream per device, so cuBLAS's workspace of it is made once, not once a call."""
    import gc
    model = _decomposed().to("cuda", torch.bfloat16)
    ids = _prompts(1, 8)
    used = []
    for _ in range(3):
        bd.generate_fast(model, ids, 6, mode="graph")
        gc.collect()
        torch.cuda.synchronize()
        used.append(torch.cuda.memory_allocated())
    assert used[1] == used[2], [u - used[0] for u in used]


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_graph_of_reference_backend_captures():
    model = _decomposed().to("cuda", torch.bfloat16)
    ids = _prompts(1, 8).cuda()
    with bd.backend("reference"):
        e = bd.StaticDecoder(model, 1, 10, 8, mode="eager").generate(ids)
        g = bd.StaticDecoder(model, 1, 10, 8, mode="graph").generate(ids)
    assert torch.equal(e, g)


def test_teacher_forced_check_aligns_with_greedy_and_restores_layers(one_thread):
    model = _decomposed()
    prompt = _prompts(1, 7)
    toks = bd.compare_greedy(model, prompt, 6, "eager")["tokens_dispatch"]
    seq = torch.cat([prompt, torch.tensor([toks])], 1)
    logits = bd.teacher_forced_logits(model, seq, prompt.shape[1])
    # step i's logits predict token i of the greedy run: the positions line up
    assert logits.shape[0] == 6 and logits.argmax(-1).tolist() == toks
    tf = bd.compare_teacher_forced(model, prompt, toks)
    assert tf["steps"] == 6 and tf["cuda"]["max_abs_logit_diff"] == 0.0  # CPU: dispatch is the reference op
    assert tf["dense_bf16"]["max_abs_logit_diff"] < 1e-4 * tf["max_abs_logit"]  # fp32 model: same math
    from libortho.model import ortho_layers
    assert all("forward" not in m.__dict__ for _, m in ortho_layers(model))
    # in bf16 the dense control rounds W and the matmul to bf16, the reference op does not: a small gap
    tf16 = bd.compare_teacher_forced(model.to(torch.bfloat16), prompt, toks)
    assert 0.0 < tf16["dense_bf16"]["max_abs_logit_diff"] < 0.1 * tf16["max_abs_logit"]


def test_a_failed_measurement_is_recorded_and_the_bench_goes_on(capsys):
    info = {"errors": {}}
    with bd._keep_going(info, "alpha1/b8", "batch 8", False, torch.device("cpu")):
        raise RuntimeError("out of memory")
    assert info["errors"] == {"alpha1/b8": "RuntimeError: out of memory"}
    assert "batch 8: FAILED RuntimeError: out of memory" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="boom"):
        with bd._keep_going(info, "x", "x", True, torch.device("cpu")):
            raise RuntimeError("boom")
    with bd._keep_going(info, "ok", "ok", False, torch.device("cpu")):
        pass
    assert "ok" not in info["errors"]


def _cut_off_run(tmp_path, monkeypatch, cut, batches):
    """bench decode on the tiny model (bf16, alpha 1, alpha 0; prefill 8) whose decode measurement ``cut(desc)``
    raises, as a time limit kills a run; returns the result path and the partial file it left."""
    real = bd.measure_decode

    def measure(*a, desc="", **kw):
        if cut(desc):
            raise RuntimeError("cut off")
        return real(*a, desc=desc, **kw)

    monkeypatch.setattr(bd, "measure_decode", measure)
    out = tmp_path / "decode-cpu.json"
    with pytest.raises(RuntimeError, match="cut off"):
        main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", *batches, "--prompt-len", "8",
              "--new-tokens", "4", "--prefill-len", "8", "--reps", "1", "--warmup", "0", "--no-progress",
              "--strict", "--variants", "bf16", "alpha1", "alpha0", "--out", str(out)])
    return out, json.loads((tmp_path / "decode-cpu.partial.json").read_text())


def test_a_cut_off_run_leaves_what_it_measured(tmp_path, monkeypatch):
    """After each measurement the numbers so far are written to <out>.partial.json (a time limit that kills the
    run mid-way, as on the GPU machine, then loses only the measurement it was in)."""
    out, part = _cut_off_run(tmp_path, monkeypatch, lambda desc: "alpha0" in desc, ["1"])
    assert not out.exists()
    assert part["partial"] is True and [r["model"] for r in part["rows"]] == ["tiny"]
    row = part["rows"][0]
    assert row["bf16_tok_s"] > 0 and row["alpha1_tok_s"] > 0 and row["alpha0_tok_s"] is None
    assert row["speedup_alpha1"] == pytest.approx(row["alpha1_tok_s"] / row["bf16_tok_s"])
    assert set(part["models"]["tiny"]["prefill"]) >= {"bf16_ms", "alpha1_ms"}
    assert "alpha0_ms" not in part["models"]["tiny"]["prefill"]


def test_a_run_cut_off_inside_a_variant_keeps_its_finished_batches(tmp_path, monkeypatch):
    """The partial file follows every measurement, not every variant: a cut in alpha 1's batch 2 keeps alpha 1's
    batch 1 (on the GPU machine the time limit came inside SmolLM2's int4 variant, after its decode rows, and took them
    along, sessions 40 and 45)."""
    _, part = _cut_off_run(tmp_path, monkeypatch, lambda desc: desc.endswith("alpha1 b=2"), ["1", "2"])
    rows = {r["batch"]: r for r in part["rows"]}
    assert rows[1]["alpha1_tok_s"] > 0 and rows[2]["alpha1_tok_s"] is None and rows[2]["bf16_tok_s"] > 0
    assert rows[1]["alpha0_tok_s"] is None and "alpha1_ms" not in part["models"]["tiny"]["prefill"]


def test_bench_decode_glu_fuses_the_libortho_rows_and_says_so(tmp_path):
    """By default (--glu) the LibOrtho rows run gate / up as one GLU layer (counted in the model's info, named in the
    header) and decode the tokens the unfused rows (--no-glu, or --no-fuse) decode (CPU: the reference op, the eager
    MLP's rounding steps)."""
    got = {}
    for flags in (["--no-glu"], ["--glu"], [], ["--no-fuse"]):
        glu = "--no-glu" not in flags and "--no-fuse" not in flags
        out = tmp_path / f"decode-{len(flags)}.json"
        main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
              "--new-tokens", "6", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--no-progress", "--strict",
              "--variants", "bf16", "alpha1", "alpha0", "--out", str(out), *flags])
        got[" ".join(flags)] = r = json.loads(out.read_text())
        assert r["protocol"]["glu"] is glu
        assert r["models"]["tiny"]["glu_layers"] == (2 if glu else 0)
        assert ("GLU layer" in out.with_suffix(".md").read_text().splitlines()[0]) is glu
    for key in ("alpha1_tokens_matching_bf16_prefix", "alpha0_tokens_matching_bf16_prefix"):
        assert len({r["rows"][0][key] for r in got.values()}) == 1, key


def test_bench_decode_norms_runs_them_in_the_products_and_says_so(tmp_path):
    """--norms (with the step op): the LibOrtho rows' layers run their norms in their products (counted, named in the
    header) and decode the tokens they decode without (CPU: the reference ops); without the step op it is refused."""
    got = {}
    for flags in ([], ["--norms"]):
        out = tmp_path / f"decode-{len(flags)}.json"
        main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
              "--new-tokens", "6", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--no-progress", "--strict",
              "--attn", "libortho-step", "--variants", "bf16", "alpha1", "alpha0", "--out", str(out), *flags])
        got[bool(flags)] = r = json.loads(out.read_text())
        assert r["protocol"]["norms"] is bool(flags)
        assert r["models"]["tiny"]["norm_layers"] == (2 if flags else 0)
        assert ("norms in the products" in out.with_suffix(".md").read_text().splitlines()[0]) is bool(flags)
    for key in ("alpha1_tokens_matching_bf16_prefix", "alpha0_tokens_matching_bf16_prefix"):
        assert got[True]["rows"][0][key] == got[False]["rows"][0][key] is not None
    for key in ("alpha1_tok_s", "alpha0_tok_s"):
        assert got[True]["rows"][0][key] > 0
    with pytest.raises(SystemExit, match="--norms: tiny's layers cannot"):
        main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
              "--new-tokens", "4", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--no-progress", "--strict",
              "--attn", "sdpa", "--variants", "alpha1", "--out", str(tmp_path / "x.json"), "--norms"])


def test_bench_decode_targets_the_lm_head_too_and_counts_it_alike(tmp_path):
    """--targets 'layers|lm_head': the LibOrtho rows decompose the (untied) head too, the bf16 row's bytes count the
    same linears (the head's 2 x 256 x 128 bytes more than by default), the header names the pattern."""
    got = {}
    for flags in ([], ["--targets", "layers|lm_head"]):
        out = tmp_path / f"decode-{len(flags)}.json"
        main(["bench", "decode", "--models", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "8",
              "--new-tokens", "4", "--prefill-len", "0", "--reps", "1", "--warmup", "0", "--no-progress", "--strict",
              "--variants", "bf16", "alpha0", "--out", str(out), *flags])
        got[bool(flags)] = r = json.loads(out.read_text())
        assert r["protocol"]["targets"] == (flags[1] if flags else None)
        assert ("'layers|lm_head'" in out.with_suffix(".md").read_text().splitlines()[0]) is bool(flags)
    row, row_head = got[False]["rows"][0], got[True]["rows"][0]
    assert row_head["bf16_weight_bytes"] - row["bf16_weight_bytes"] == 256 * 128 * 2
    assert row_head["alpha0_weight_bytes"] > row["alpha0_weight_bytes"]  # the head's INT4 base, scales, ortho
    assert row_head["alpha0_weight_bytes"] - row["alpha0_weight_bytes"] < 256 * 128 * 2 / 2


@pytest.mark.parametrize("pdl,limit,says", [(True, 1, ", LibOrtho PDL first up to M = 1, "),
                                            (True, None, ", LibOrtho PDL first, "),
                                            (False, 1, "one GLU layer, median")])
def test_the_summary_names_the_pdl_mode_and_its_row_limit(pdl, limit, says):
    """A result's summary line says LibOrtho's PDL mode and $LIBORTHO_PDL_MAX_M where PDL was on (session 43's file)."""
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    path = results / "decode-H200-llama2-7b-shape-compile-s43-b1-first.json"
    result = json.loads(path.read_text())
    result["protocol"].update(pdl=pdl, pdl_max_m=limit)
    head = bd.summary(result).splitlines()[0]
    assert says in head and (pdl or "PDL" not in head)
