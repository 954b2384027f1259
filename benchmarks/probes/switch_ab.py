"""A/B in one process (GPU machine) of a run-time switch of the CUDA extension, e.g.
``set_v1_lean_ortho_first_max_m`` (the ortho-first v1 configurations 13-16, the table's short-grid choice at M <= 4,
in their lean form up to that M; 0 = never) or ``set_v1_row_pairs_split`` (two-row-tile configurations cut their last
wave into single tiles; 0 / 1). For each shape, M, density and alpha, CUDA graphs of calls rotating through weight
copies beyond 4x L2 are captured with each value (the launcher reads the switch at capture) and replayed in turn, so
clock drift hits all alike; medians per call, and whether every value gave the same bits.

    PYTHONPATH=src python benchmarks/probes/switch_ab.py --switch v1_lean_ortho_first_max_m --values 0 2 4 \
        --shapes 4096x4096 2048x4096 --m 1 2 4 --out benchmarks/results/lean-ortho-first-ab-<card>.json
    # with the row-pair draft applied (git revert of its revert; notes of 2026-11-30, session 29):
    PYTHONPATH=src python benchmarks/probes/switch_ab.py --switch v1_row_pairs_split --values 0 1 \
        --shapes 14336x4096 22016x4096 11008x4096 --m 1 4 8 16 --out benchmarks/results/row-pairs-ab-<card>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json

import torch

from libortho.eval.bench_kernels import (_capture, _clone_layer, _copies, _layer_bytes, _layer_call, _ortho_layer,
                                         time_graphs)
from libortho.ops import cuda as cuda_ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--switch", required=True, help="extension setter without set_, e.g. v1_row_pairs_split")
    p.add_argument("--values", type=int, nargs="+", required=True, help="the first is the baseline")
    p.add_argument("--shapes", nargs="*", default=["4096x4096"])
    p.add_argument("--m", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--densities", type=float, nargs="*", default=[0.0, 0.01, 0.05])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="switch-ab.json")
    a = p.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    ext = cuda_ops._state["ext"]
    get, put = getattr(ext, a.switch), getattr(ext, "set_" + a.switch)
    was = get()
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
                        for v in a.values:
                            put(type(was)(v))
                            before = ext.v1_lean_launches()
                            outs.append(_layer_call(lay, x, alpha)())
                            lean = ext.v1_lean_launches() > before
                            graphs.append((v, lean, _capture([_layer_call(c, x, alpha) for c in copies], calls)))
                        same = all(torch.equal(outs[0], o) for o in outs[1:])
                        med = dict(zip(a.values, time_graphs([g for _, _, g in graphs], a.rounds, calls)))
                        rows.append({"N": n, "K": k, "M": m, "density": d, "alpha": alpha, "same_bits": same,
                                     "lean": {str(v): ln for v, ln, _ in graphs}, "us": {str(v): t for v, t in med.items()}})
                        base = med[a.values[0]]
                        print(f"{shape} M={m} d={d} alpha={alpha}: " + "  ".join(
                            f"{a.switch} {v}{' (lean)' if ln else ''}: {med[v]:.2f} us ({med[v] / base:.3f})"
                            for v, ln, _ in graphs) + f"  bits equal: {same}", flush=True)
                        del graphs
                del copies
    finally:
        put(was)
    json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "switch": a.switch,
               "values": a.values, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "method": __doc__, "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
