"""The null test's spread at large M (GPU machine): base-only graphs against alpha = 0 graphs of layers that carry an
ortho stream, next to a second, identical set of base-only copies (the same code and bytes, other addresses), all
replayed in turn for many rounds. Where alpha 0 and base only differ by no more than two identical base-only sets
differ, the null test is limited by the harness, not by the ortho arrays.

    PYTHONPATH=src python benchmarks/probes/null_spread.py --out benchmarks/results/null-spread-<card>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics

import torch

from libortho.eval.bench_kernels import _clone_layer, _copies, _layer_bytes, _layer_call, _ortho_layer, time_interleaved
from libortho.ops import cuda as cuda_ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["1024x4096", "4096x4096"])
    p.add_argument("--m", type=int, nargs="*", default=[512])
    p.add_argument("--densities", type=float, nargs="*", default=[0.005, 0.01, 0.02, 0.05])
    p.add_argument("--rounds", type=int, nargs="*", default=[15, 60])
    p.add_argument("--out", default="null-spread.json")
    a = p.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    rows = []
    for shape in a.shapes:
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        base = _ortho_layer(w, 4, 128, 0.0)
        nq = _copies(_layer_bytes(base, 0))
        sets = {"base": [base] + [_clone_layer(base) for _ in range(nq - 1)],
                "base2": [_clone_layer(base) for _ in range(nq)]}
        for d in a.densities:
            lay = _ortho_layer(w, 4, 128, d)
            sets[f"alpha0 d={d}"] = [lay] + [_clone_layer(lay) for _ in range(nq - 1)]
        for m in a.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            calls = max(2 * nq, 24)
            for rounds in a.rounds:
                names = list(sets)
                t = time_interleaved([[_layer_call(c, x, 0.0) for c in sets[s]] for s in names], rounds, calls)
                res = dict(zip(names, t))
                b = res["base"]
                rows.append({"N": n, "K": k, "M": m, "rounds": rounds, "us": res,
                             "ratio_to_base": {s: v / b for s, v in res.items()}})
                print(f"{shape} M={m} rounds={rounds}: " + "  ".join(f"{s} {v:.2f} us ({v / b:.3f})" for s, v in res.items()),
                      flush=True)
        del sets
    json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "method": __doc__,
               "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
