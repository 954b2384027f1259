"""Kernel timeline of the captured decode step (GPU machine): the 7B-shaped model of ``libortho bench decode``,
compiled and captured as ``--mode compile`` runs it (batch 1, or ``--batch``), its CUDA graph replayed under
torch.profiler.

decode_profile.py times the compiled step's kernels called outside the graph. Here they run as in the benchmark (one
graph replay a step, with programmatic dependent launch where it is on), so the timeline shows what running them back
to back costs: for each kernel the gap from the end of the kernel before it (negative: the two overlapped, as
programmatic dependent launch allows), summed per pair of categories, next to the kernels' own times per category.
A PDL setting that slows the step shows whether its kernels ran longer (blocks crowded out by waiting dependents,
prefetches competing for DRAM) or its gaps grew. The step time of the same graph without the profiler is beside it
(the profiler's own cost inside a graph shows as the difference from the profiled span).

    PYTHONPATH=src python benchmarks/probes/decode_timeline.py --variants bf16 alpha0 --attn libortho-step
    LIBORTHO_PDL=late-noprefetch PYTHONPATH=src python benchmarks/probes/decode_timeline.py --inductor-pdl --tag ...
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch

from libortho.eval import bench_decode as bd
from libortho.eval.bench_kernels import write_probe_results

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling probe, also when loaded by path (tests)
from decode_profile import captured_decoder  # noqa: E402

TOP_KERNELS = 16  # the kernel names listed per variant, by busy time
CATEGORIES = ("libortho linear", "attention", "cuBLAS", "triton", "memcpy / memset", "other")


def category(name: str) -> str:
    n = name.lower()
    if "fused_small_m" in n or "transpose_x" in n or "dequant" in n or "ortho_add" in n:
        return "libortho linear"
    if "attention" in n or "flash" in n or "fmha" in n or "sdpa" in n or "cudnn" in n:
        return "attention"
    if "gemm" in n or "gemv" in n or "nvjet" in n or "cutlass" in n or "sm90_xmma" in n:
        return "cuBLAS"
    if n.startswith("triton") or "triton_" in n:
        return "triton"
    if "memcpy" in n or "memset" in n:
        return "memcpy / memset"
    return "other"


def timeline(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """Per-step figures of ``kernels`` = (name, start_us, end_us) of ``steps`` replays of one graph: the kernels'
    busy time per category, and the gaps between consecutive kernels of a replay (start minus the previous kernel's
    end; negative: overlap) summed per "previous -> next" category pair. The step from one replay's last kernel to
    the next replay's first is left out (it is the host's replay launch, not the graph's)."""
    if steps < 1 or not kernels or len(kernels) % steps:
        raise ValueError(f"{len(kernels)} kernels do not split into {steps} replays of one graph")
    kernels = sorted(kernels, key=lambda k: k[1])
    per = len(kernels) // steps
    busy, gap_sum, gap_n, overlap = collections.Counter(), collections.Counter(), collections.Counter(), 0.0
    by_name, count = collections.Counter(), collections.Counter()
    spans = []
    for s in range(steps):
        step = kernels[s * per:(s + 1) * per]
        spans.append(max(e for _, _, e in step) - step[0][1])
        for i, (name, start, end) in enumerate(step):
            busy[category(name)] += (end - start) / steps
            by_name[name[:200]] += (end - start) / steps
            count[name[:200]] += 1
            if i:
                prev = step[i - 1]
                pair = f"{category(prev[0])} -> {category(name)}"
                gap = start - prev[2]
                gap_sum[pair] += gap / steps
                gap_n[pair] += 1 / steps
                overlap += min(gap, 0.0) / steps
    return {"kernels_per_step": per, "span_us": statistics.median(spans), "busy_us": dict(busy.most_common()),
            "busy_total_us": sum(busy.values()), "gaps_us": dict(gap_sum.most_common()),
            "gaps_per_step": {k: gap_n[k] for k in gap_sum}, "gap_total_us": sum(gap_sum.values()),
            "overlap_us": overlap,
            "kernels_us": {n: {"us": us, "per_step": count[n] / steps} for n, us in by_name.most_common(TOP_KERNELS)}}


def device_kernels(prof, device_type=torch.autograd.DeviceType.CUDA) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every activity on ``device_type`` the profiler recorded, from kineto's own events
    (a graph replay's kernels share the replay's correlation id; they need no CPU operator to be listed)."""
    return [(ev.name(), ev.start_ns() / 1e3, ev.end_ns() / 1e3) for ev in prof.profiler.kineto_results.events()
            if ev.device_type() == device_type]


def profile_variant(model, prompts, steps: int) -> dict:
    dec, graph_ms = captured_decoder(model, prompts, steps)
    graph_us = graph_ms * 1e3
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec.decode(steps)
        torch.cuda.synchronize()
    kernels = device_kernels(prof)
    if not kernels:
        return {"graph_step_us": graph_us, "error": "the profiler recorded no kernel inside the graph replays"}
    try:
        return dict(timeline(kernels, steps), graph_step_us=graph_us)
    except ValueError as e:  # e.g. the profiler missed or added activities: say so, keep the other settings going
        names = collections.Counter(category(n) for n, _, _ in kernels)
        return {"graph_step_us": graph_us, "error": str(e), "kernels_by_category": dict(names)}


def show(name: str, r: dict) -> None:
    if "error" in r:
        print(f"{name}: graph step {r['graph_step_us']:.1f} us; {r['error']}", flush=True)
        return
    print(f"{name}: graph step {r['graph_step_us']:.1f} us (profiled span {r['span_us']:.1f}), "
          f"{r['kernels_per_step']} kernels, busy {r['busy_total_us']:.1f} us, gaps {r['gap_total_us']:.1f} us "
          f"(overlap {r['overlap_us']:.1f})", flush=True)
    for c, us in r["busy_us"].items():
        print(f"  busy {c:18s} {us:8.1f} us", flush=True)
    for n, k in r["kernels_us"].items():
        print(f"  kernel {k['us']:8.1f} us  x{k['per_step']:.0f}  {n}", flush=True)
    for p, us in r["gaps_us"].items():
        print(f"  gap  {p:40s} {us:8.1f} us over {r['gaps_per_step'][p]:.0f} ({us / r['gaps_per_step'][p]:.2f} each)",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="", help="a name for this run's setting, kept in the rows (e.g. the PDL mode)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded at once (bench decode's --batches)")
    ap.add_argument("--variants", nargs="+", default=["bf16", "alpha1", "alpha0"], choices=["bf16", "alpha1", "alpha0"])
    ap.add_argument("--attn", default="libortho-step", choices=["sdpa", "libortho", "libortho-step"])
    ap.add_argument("--glu", action="store_true", help="gate/up as one GLU layer (bench decode's default)")
    ap.add_argument("--norms", action="store_true", help="the norms in the products (bench decode --norms)")
    ap.add_argument("--inductor-pdl", action="store_true", help="inductor's Triton kernels with PDL (bench decode's)")
    args = ap.parse_args()
    from libortho.attention import use_attention_step, use_decode_attention
    from libortho.config import OrthoConfig
    from libortho.fuse import fuse_siblings
    from libortho.glu import fuse_glu
    from libortho.norms import fuse_norms
    from libortho.model import ortho_layers, set_alpha
    from libortho.ops import cuda as cuda_ops
    device = torch.device("cuda")
    model, tok, desc = bd.load_bench_model("llama2-7b-shape", device)
    if args.batch < 1:
        raise SystemExit(f"--batch {args.batch}: expected a positive number of sequences")
    prompts = bd.make_prompts(tok, model.config.vocab_size, args.batch, 128).to(device)
    if args.attn != "sdpa":
        use_decode_attention(model)
    if args.attn == "libortho-step":
        use_attention_step(model)
    setting = {"tag": args.tag, "batch": args.batch, "attn": args.attn, "glu": args.glu, "norms": args.norms,
               "inductor_pdl": args.inductor_pdl, "pdl_mode": cuda_ops.pdl_name()}
    rows = []
    with torch.no_grad(), bd.inductor_tuning(False, args.inductor_pdl):
        for v in sorted(set(args.variants), key=("bf16", "alpha1", "alpha0").index):  # bf16 before decomposing
            if v != "bf16" and not ortho_layers(model):
                bank = bd.LinearBank(model, progress=False)
                cfg = OrthoConfig(bits=4, group_size=128, density=0.01, score="magnitude", method="rtn",
                                  dtype="bfloat16")
                bank.install(bd._ortho_maker(cfg), "decompose", progress=False)
                if args.glu:
                    fuse_glu(model)
                fuse_siblings(model)
                if args.norms and not fuse_norms(model):
                    raise SystemExit("--norms: the layers cannot take it (libortho.norms.why_not_norms)")
            if v != "bf16":
                set_alpha(model, 1.0 if v == "alpha1" else 0.0)
            torch._dynamo.reset()
            r = dict(profile_variant(model, prompts, args.steps), variant=v, **setting)
            rows.append(r)
            show(f"{v} ({args.attn}, inductor PDL {args.inductor_pdl}, LibOrtho PDL {setting['pdl_mode']})", r)
    write_probe_results(args.out or f"benchmarks/results/decode-timeline-{bd.card_name(device)}.json", rows, __doc__,
                        model=desc)


if __name__ == "__main__":
    main()
