"""A/B in one process (GPU machine): the ortho-first v1 configurations (13-16; the table's short-grid choice at
M <= 4, e.g. 4096x4096) in their lean form up to M tokens (``set_v1_lean_ortho_first_max_m``) against their full
form (the default, 0). For each shape, M and density, CUDA graphs of calls rotating through weight copies beyond
4x L2 are captured with each setting and replayed in turn, so clock drift hits both alike; medians per call.

    PYTHONPATH=src python benchmarks/probes/lean_ortho_first_ab.py --out benchmarks/results/lean-ortho-first-ab-<card>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics

import torch

from libortho.eval.bench_kernels import _capture, _clone_layer, _copies, _layer_bytes, _layer_call, _ortho_layer
from libortho.ops import cuda as cuda_ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["4096x4096"])
    p.add_argument("--m", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--densities", type=float, nargs="*", default=[0.0, 0.01, 0.05])
    p.add_argument("--settings", type=int, nargs="*", default=[0, 2, 4])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="lean-ortho-first-ab.json")
    a = p.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    ext = cuda_ops._state["ext"]
    rows = []
    try:
        for shape in a.shapes:
            n, k = map(int, shape.split("x"))
            w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
            for d in a.densities:
                lay = _ortho_layer(w, 4, 128, d)
                nq = _copies(_layer_bytes(lay, 1.0))
                copies = [lay] + [_clone_layer(lay) for _ in range(nq - 1)]
                for m in a.m:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    calls = max(2 * nq, 24)
                    for alpha in ((0.0,) if d == 0 else (0.0, 1.0)):
                        graphs, outs = [], []
                        for s in a.settings:
                            ext.set_v1_lean_ortho_first_max_m(s)
                            before = ext.v1_lean_launches()
                            outs.append(_layer_call(lay, x, alpha)())
                            lean = ext.v1_lean_launches() > before
                            graphs.append((s, lean, _capture([_layer_call(c, x, alpha) for c in copies], calls)))
                        same = all(torch.equal(outs[0], o) for o in outs[1:])
                        times = {s: [] for s, _, _ in graphs}
                        for _ in range(a.rounds):
                            for s, _, g in graphs:
                                b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                                b.record(); g.replay(); e.record(); torch.cuda.synchronize()
                                times[s].append(b.elapsed_time(e) * 1e3 / calls)
                        med = {s: statistics.median(t) for s, t in times.items()}
                        row = {"N": n, "K": k, "M": m, "density": d, "alpha": alpha, "same_bits": same,
                               "lean": {str(s): ln for s, ln, _ in graphs}, "us": {str(s): v for s, v in med.items()}}
                        rows.append(row)
                        base = med[a.settings[0]]
                        print(f"{shape} M={m} d={d} alpha={alpha}: " + "  ".join(
                            f"max_m {s}{' (lean)' if ln else ''}: {med[s]:.2f} us ({med[s] / base:.3f})"
                            for s, ln, _ in graphs) + f"  bits equal: {same}", flush=True)
                        del graphs
                del copies
    finally:
        ext.set_v1_lean_ortho_first_max_m(0)
    json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "method": __doc__, "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
