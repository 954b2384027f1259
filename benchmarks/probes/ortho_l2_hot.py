"""Would an L2 prefetch of the next launch's ortho arrays pay (GPU machine)? One launch's time at M = 1 when its
ortho stream (row pointers, columns, values) is already in L2 against when it is not, nothing else changed.

At alpha 1 a launch waits on a chain of dependent loads (row pointers, then columns and values, then x) that the
weight stream cannot hide (NOTES-kernels.md, 2026-11-30: 1.6-6.1 us per launch at 1 %). If those loads hit L2, the
chain shortens; a launch could then prefetch the next launch's arrays. This probe measures the bound of that gain
before any kernel changes: each layer copy (rotated beyond L2, as the kernel bench does) is called after a small
"touch" kernel that reads either its own ortho arrays (hot) or those of a copy half a rotation away (cold: the same
touch work, no benefit). Graphs of touch + call pairs, replayed in turn; the difference of the two pair times is the
launch's gain from a hot ortho stream. Alpha 0 never reads the arrays: its hot and cold times must agree (the control).

    PYTHONPATH=src python benchmarks/probes/ortho_l2_hot.py --out benchmarks/results/ortho-l2-hot-<card>.json
"""
from __future__ import annotations

import argparse

import torch

from libortho.eval.bench_kernels import (_clone_layer, _copies, _layer_bytes, _layer_call, _ortho_layer, card_name,
                                         time_interleaved, write_probe_results)
from libortho.ops import cuda as cuda_ops

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "1024x4096", "12288x4096", "22016x4096"]


def touch(layer):
    """A read of every byte of the layer's ortho arrays (three small reductions), which leaves them in L2."""
    def fn():
        layer.row_ptr.sum()
        layer.col_idx.sum()
        layer.values.sum()
    return fn


def pairs(copies, x, alpha, hot: bool):
    """Touch + call for each copy: the touch reads the called copy's arrays (hot) or another's (cold)."""
    n = len(copies)
    fns = []
    for i, c in enumerate(copies):
        t = touch(c if hot else copies[(i + n // 2) % n])
        fns.append(t)
        fns.append(_layer_call(c, x, alpha))
    return fns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=SHAPES)
    p.add_argument("--m", type=int, nargs="*", default=[1, 4])
    p.add_argument("--densities", type=float, nargs="*", default=[0.01, 0.05])
    p.add_argument("--replays", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    rows = []
    for shape in a.shapes:
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for d in a.densities:
            lay = _ortho_layer(w, 4, 128, d)
            copies = [lay] + [_clone_layer(lay) for _ in range(max(4, _copies(_layer_bytes(lay, 1))) - 1)]
            for m in a.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                calls = 2 * len(copies)
                groups = [pairs(copies, x, alpha, hot) for alpha in (0.0, 1.0) for hot in (False, True)]
                # us per pair (touch + call; the graph's calls count both): the touches cost the same in both
                a0_cold, a0_hot, a1_cold, a1_hot = (2 * ti for ti in time_interleaved(groups, a.replays, calls))
                rows.append({"N": n, "K": k, "M": m, "density": d, "ortho_nnz": lay.ortho_nnz,
                             "ortho_bytes": lay.storage_bytes()["ortho"], "copies": len(copies),
                             "alpha0_cold_pair_us": a0_cold, "alpha0_hot_pair_us": a0_hot,
                             "alpha1_cold_pair_us": a1_cold, "alpha1_hot_pair_us": a1_hot,
                             "alpha1_gain_us": a1_cold - a1_hot, "alpha0_control_us": a0_cold - a0_hot})
                print(f"{shape:>11} M={m:<2} d={d:<5} alpha 1 touch + call: cold {a1_cold:6.2f} us, hot {a1_hot:6.2f} "
                      f"us (gain {a1_cold - a1_hot:+.2f}); alpha 0 (control): {a0_cold:6.2f} / {a0_hot:6.2f} us",
                      flush=True)
    write_probe_results(a.out or f"benchmarks/results/ortho-l2-hot-{card_name()}.json", rows, __doc__)


if __name__ == "__main__":
    main()
