"""Where a decode step's time goes (GPU machine): the 7B-shaped model of ``libortho bench decode``, compiled
step, batch 1, profiled kernel by kernel.

The compiled step (``torch.compile(fullgraph=True)``, as ``--mode compile`` runs it before capturing it in a
CUDA graph) is called outside the graph under torch.profiler; each kernel's GPU time is summed into a
category (LibOrtho's op, attention, the lm_head's GEMM, Triton kernels of the compiled elementwise and norm
code, other). Next to it: the graph replay's time per step, whose excess over the sum of kernel times is
what launching the kernels back to back costs inside the graph.

The step runs LibOrtho's decode attention (``libortho.attention``) and the shared-length static cache
(``libortho.static_cache``); ``--attn libortho-step`` profiles it with the attention step op (``bench decode``'s default
on a GPU since session 36), ``--attn sdpa`` with transformers' SDPA.
``--sdpa`` profiles other attention backends (torch's scaled_dot_product_attention restricted to one). The
choice is made when the step is compiled, and neither dynamo's guards nor inductor's caches key on it: run
with TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0, or every backend gets the first one's graph.

    PYTHONPATH=src python benchmarks/probes/decode_profile.py   # writes benchmarks/results/decode-profile-<card>.json
"""
from __future__ import annotations

import argparse
import collections

import torch

from libortho.eval import bench_decode as bd
from libortho.eval.bench_kernels import write_probe_results


SDPA_BACKENDS = ("default", "cudnn", "efficient", "flash", "math")


def set_sdpa_backend(name: str) -> None:
    """Let scaled_dot_product_attention use only one backend ('default': all of them, torch picks)."""
    on = lambda k: name in ("default", k)  # noqa: E731
    torch.backends.cuda.enable_cudnn_sdp(on("cudnn"))
    torch.backends.cuda.enable_mem_efficient_sdp(on("efficient"))
    torch.backends.cuda.enable_flash_sdp(on("flash"))
    torch.backends.cuda.enable_math_sdp(on("math"))


def category(name: str) -> str:
    n = name.lower()
    if "fused_small_m" in n or "transpose_x" in n or "dequant" in n:
        return "libortho op"
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n or "efficient" in n:
        return "attention"
    if "gemm" in n or "gemv" in n or "cutlass" in n or "sm90" in n:
        return "cuBLAS (lm_head)"
    if n.startswith("triton") or "triton_" in n:
        return "triton (compiled elementwise / norms / rotary)"
    return "other"


def captured_decoder(model, prompts, steps: int):
    """The compiled, captured decode step at the batch of ``prompts`` (as ``bench decode --mode compile`` runs it) and
    its time per step over ``steps`` graph replays after a prefill, in ms; the decoder comes back prefilled again."""
    dec = bd.StaticDecoder(model, prompts.shape[0], steps + 8, prompts.shape[1], mode="compile")
    dec.prepare(prompts)
    dec.prefill(prompts)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    dec.decode(steps)
    e.record()
    torch.cuda.synchronize()
    graph_ms = s.elapsed_time(e) / steps
    dec.prefill(prompts)
    return dec, graph_ms


def profile_alpha(model, prompts, alpha, steps):
    from libortho.model import set_alpha
    set_alpha(model, alpha)
    dec, graph_ms = captured_decoder(model, prompts, steps)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec._fn()
        torch.cuda.synchronize()
    per_cat, per_kernel, launches = collections.Counter(), collections.Counter(), collections.Counter()
    kernel_launches = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time / steps
            per_cat[category(ev.name)] += us
            per_kernel[ev.name[:120]] += us
            kernel_launches[ev.name[:120]] += 1 / steps
            launches[category(ev.name)] += 1 / steps
    total = sum(per_cat.values())
    return {"alpha": alpha, "graph_step_ms": graph_ms, "kernel_sum_ms": total / 1e3,
            "launch_gap_ms": graph_ms - total / 1e3, "kernels_per_step": sum(launches.values()),
            "categories_us": dict(per_cat.most_common()), "launches_per_step": dict(launches.most_common()),
            "top_kernels_us": dict(per_kernel.most_common(25)),
            "top_kernels_launches_per_step": {k: kernel_launches[k] for k, _ in per_kernel.most_common(25)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--sdpa", nargs="+", default=["default"], choices=SDPA_BACKENDS,
                    help="attention backends to profile (each alpha with each)")
    ap.add_argument("--attn", nargs="+", default=["libortho"], choices=["sdpa", "libortho", "libortho-step"],
                    help="attention of the decode steps: LibOrtho's, with the rotary embedding and the cache writes in "
                         "its op (libortho-step, bench decode's default on a GPU since session 36) or not, or "
                         "transformers' SDPA (with --sdpa's backends)")
    ap.add_argument("--coordinate-descent", action="store_true",
                    help="inductor tunes its Triton kernels by coordinate descent (bench decode's option)")
    args = ap.parse_args()
    from libortho.config import OrthoConfig
    from libortho.attention import use_attention_step, use_decode_attention
    from libortho.fuse import fuse_siblings
    device = torch.device("cuda")
    model, tok, desc = bd.load_bench_model("llama2-7b-shape", device)
    prompts = bd.make_prompts(tok, model.config.vocab_size, 1, 128).to(device)
    bank = bd.LinearBank(model, progress=False)
    cfg = OrthoConfig(bits=4, group_size=128, density=0.01, score="magnitude", method="rtn", dtype="bfloat16")
    rows = []
    with torch.no_grad():
        bank.install(bd._ortho_maker(cfg), "decompose", progress=False)
        fuse_siblings(model)
        cases = []  # (attention, SDPA backend, alpha)
        if "sdpa" in args.attn:
            cases += [("sdpa", b, a) for b in args.sdpa for a in args.alphas]
        for attn in ("libortho", "libortho-step"):
            if attn in args.attn:
                cases += [(attn, "default", a) for a in args.alphas]
        for attn, sdpa, alpha in cases:
            set_sdpa_backend(sdpa)
            use_decode_attention(model, attn != "sdpa")
            use_attention_step(model, attn == "libortho-step")
            torch._dynamo.reset()  # the backend is chosen when the step is traced; dynamo's guards do not see it
            name = f"{attn} attention" if attn != "sdpa" else f"sdpa {sdpa}"
            try:
                with bd.inductor_tuning(args.coordinate_descent):
                    r = dict(profile_alpha(model, prompts, alpha, args.steps), sdpa=sdpa, attn=attn,
                             coordinate_descent=args.coordinate_descent)
            except Exception as e:  # noqa: BLE001  (a backend that cannot run this case)
                print(f"{name} alpha {alpha:g}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append({"sdpa": sdpa, "attn": attn, "alpha": alpha, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append(r)
            print(f"{name}, alpha {alpha:g}: graph step {r['graph_step_ms']:.3f} ms, kernels {r['kernel_sum_ms']:.3f} ms "
                  f"({r['kernels_per_step']:.0f} per step), launch gaps {r['launch_gap_ms']:.3f} ms", flush=True)
            for c, us in r["categories_us"].items():
                print(f"  {c:50s} {us / 1e3:7.3f} ms  ({r['launches_per_step'][c]:.0f} kernels)", flush=True)
            for k, us in list(r["top_kernels_us"].items())[:12]:
                print(f"    {us:8.1f} us  {r['top_kernels_launches_per_step'][k]:4.0f}x  {k}", flush=True)
    write_probe_results(args.out or f"benchmarks/results/decode-profile-{bd.card_name(device)}.json", rows, __doc__,
                        model=desc)


if __name__ == "__main__":
    main()
