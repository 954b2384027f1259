"""GPTQ sweep on a GPU: the eager per-column loop against the CUDA-graph block sweep (bit-identical
check and time per SmolLM2 layer shape). Writes benchmarks/results/gptq-sweep-<card>.json.

    python benchmarks/gptq_sweep_gpu.py [--out-dir benchmarks/results] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptq_equivalence import SHAPES, hessian, same  # noqa: E402

from libortho.gptq import gptq_decompose  # noqa: E402

CASES = [(shape, bits, dens, score) for shape in SHAPES[1:] for bits, dens, score in
         [(4, 0.01, "hessian"), (3, 0.05, "hessian"), (4, 0.0, "hessian"), (4, 0.01, "random")]]


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows, failures = [], 0
    for (n, k), bits, dens, score in CASES:
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02).cuda()
        h = hessian(k, k).cuda()
        kw = dict(bits=bits, group_size=128, density=dens, score=score, act_order=True)
        a, t_eager = timed(lambda: gptq_decompose(w, h, sweep="eager", **kw), args.repeat)
        gptq_decompose(w, h, sweep="static", **kw)  # captures the graphs of this shape
        b, t_graph = timed(lambda: gptq_decompose(w, h, sweep="static", **kw), args.repeat)
        ok = same(a[0], b[0]) and same(a[1].scales, b[1].scales) and (
            a[2] is None or all(same(getattr(a[2], f), getattr(b[2], f)) for f in ("row_ptr", "col_idx", "values")))
        failures += not ok
        rows.append(dict(N=n, K=k, bits=bits, density=dens, score=score, eager_ms=1e3 * t_eager,
                         graph_ms=1e3 * t_graph, speedup=t_eager / t_graph, bit_identical=ok))
        print(f"{n:5d}x{k:<5d} int{bits} {score:8s} d={dens:<5g} eager {1e3 * t_eager:8.1f} ms  "
              f"graph {1e3 * t_graph:7.1f} ms  x{t_eager / t_graph:5.1f}  {'ok' if ok else 'MISMATCH'}", flush=True)
    card = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out_dir) / f"gptq-sweep-{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                                   date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   command="python benchmarks/gptq_sweep_gpu.py", rows=rows), indent=1))
    print(f"{len(rows) - failures}/{len(rows)} bit-identical; wrote {out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
