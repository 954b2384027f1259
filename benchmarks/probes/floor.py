"""Where the decode kernel's time goes (GPU machine): is it the bytes, or a floor per launch and per block?

* null: a graph of back-to-back one-element kernels, the per-launch floor of the harness;
* sweep: the op at M = 1, alpha 0, over N at K = 4096 and over K at N = 4096, each cold (copies beyond
  4x L2 in turn, as in the kernel bench) and warm (one copy again and again: its bytes stay in L2 where
  they fit), bf16 F.linear cold beside it. A kernel bound by HBM bytes runs much faster warm; the slope of
  time over bytes is its streaming rate, the intercept its fixed cost.

    PYTHONPATH=src python benchmarks/probes/floor.py   # writes benchmarks/results/floor-<card>.json
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from libortho.eval.bench_kernels import (_clone_layer, _copies, _layer_bytes, _ortho_layer, card_name, time_interleaved,
                                         write_probe_results)
from libortho.layer import run_packed
from libortho.ops import cuda as cuda_ops

SHAPES = [(1024, 4096), (4096, 4096), (11008, 4096), (22016, 4096), (4096, 1024), (4096, 2048), (4096, 8192),
          (4096, 11008), (4096, 16384)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="*", default=[1])
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--replays", type=int, default=15)
    args = ap.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    one = torch.zeros(1, device="cuda")
    null = time_interleaved([[lambda: one.add_(1)]], args.replays, 64)[0]
    print(f"null kernel: {null:.2f} us per launch", flush=True)
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        lay = _ortho_layer(w, 4, 128, args.density)
        copies = _copies(_layer_bytes(lay, 1.0))
        lays = [lay] + [_clone_layer(lay) for _ in range(copies - 1)]
        ws = [w] + [w.clone() for _ in range(_copies(n * k * 2) - 1)]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            mb = _layer_bytes(lay, 0.0) / 2 ** 20
            row = {"N": n, "K": k, "M": m, "int4_mb": mb}
            for alpha in (0.0, 1.0):
                cold, warm = time_interleaved([[lambda a=a: run_packed(a, x, alpha) for a in lays],
                                               [lambda: run_packed(lay, x, alpha)]], args.replays, 2 * copies)
                row[f"alpha{alpha:g}_cold_us"], row[f"alpha{alpha:g}_warm_us"] = cold, warm
            row["bf16_cold_us"] = time_interleaved([[lambda wi=wi: F.linear(x, wi) for wi in ws]], args.replays,
                                                   2 * len(ws))[0]
            row["alpha0_cold_GBps"] = mb * 2 ** 20 / row["alpha0_cold_us"] / 1e3
            rows.append(row)
            print(f"{n}x{k} M={m} ({mb:.1f} MB): alpha0 cold {row['alpha0_cold_us']:.2f} warm "
                  f"{row['alpha0_warm_us']:.2f} us ({row['alpha0_cold_GBps']:.0f} GB/s cold); alpha1 cold "
                  f"{row['alpha1_cold_us']:.2f} warm {row['alpha1_warm_us']:.2f}; bf16 cold {row['bf16_cold_us']:.2f}",
                  flush=True)
    write_probe_results(args.out or f"benchmarks/results/floor-{card_name()}.json", rows, __doc__,
                        density=args.density, v1_table=cuda_ops.v1_table(), null_us=null)


if __name__ == "__main__":
    main()
