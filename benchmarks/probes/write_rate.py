"""Is the prefill path's dequantize step at HBM's rate for its mix of traffic? (GPU machine)

For each Llama shape N x K: the dequantize kernel alone (INT4 g128 -> bf16 W at alpha 0: ~0.53 byte read and 2
bytes written per weight), next to plain torch kernels over W's bytes: a copy (1:1 read:write), a write-only
fill, and an expand that reads a quarter of W's bytes and writes all of them (1:4, near the dequantize step's
mix). Every variant cold (buffers rotating beyond 4x L2, as in the kernel bench), CUDA graphs, medians. If the
dequantize step runs near the expand's rate, its ceiling is the write-mostly traffic rather than the kernel,
and the M = 512 goal (<= 1.5x bf16) is out of reach for dequantize + cuBLAS on those shapes.

    PYTHONPATH=src python benchmarks/probes/write_rate.py   # writes benchmarks/results/write-rate-<card>.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]


def traffic(n: int, k: int, int4_bytes: int) -> dict[str, int]:
    """Bytes each variant moves (read + write) for an N x K bf16 weight; int4_bytes: the packed base with its
    scales and zeros (what the dequantize step reads at alpha 0)."""
    w = n * k * 2
    return {"dequant": int4_bytes + w, "copy": 2 * w, "write_only": w, "expand_1_4": w // 4 + w}


def main() -> None:
    import torch

    from libortho import quant
    from libortho.eval.bench_kernels import (_clone_layer, _copies, _layer_bytes, _ortho_layer, card_name,
                                             time_interleaved, write_probe_results)
    from libortho.ops import cuda as cuda_ops

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--replays", type=int, default=15)
    args = ap.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    ext = cuda_ops.extension()
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        lay = _ortho_layer(w, 4, 128, 0.01)
        x = torch.randn(512, k, device="cuda", dtype=torch.bfloat16)
        gs = quant.effective_group_size(lay.group_size, k)
        moved = traffic(n, k, _layer_bytes(lay, 0.0))
        lays = [lay] + [_clone_layer(lay) for _ in range(_copies(moved["dequant"]) - 1)]
        nw = _copies(n * k * 2)
        src = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nw)]
        dst = [torch.empty_like(s) for s in src]
        quarter = [s.view(-1)[: n * k // 4] for s in src]

        def deq(a):  # the op's own call of the step (ortho_linear_cuda at M > 16), without the product
            bf = lambda t, name: cuda_ops._as(t, x.dtype, name)  # noqa: E731
            return cuda_ops._checked(ext.dequant_merge(x, a.qweight, bf(a.scales, "scales"), bf(a.zeros, "zeros"),
                                                       a.row_ptr, a.col_idx, bf(a.values, "ortho values"), 0.0, 4,
                                                       gs, n, k), "dequant kernel")

        groups = {
            "dequant": [lambda a=a: deq(a) for a in lays],
            "copy": [lambda d=d, s=s: d.copy_(s) for d, s in zip(dst, src)],
            "write_only": [lambda d=d: d.zero_() for d in dst],
            "expand_1_4": [lambda d=d, q=q: d.view(-1, 4).copy_(q.view(-1, 1).expand(-1, 4)) for d, q in zip(dst, quarter)],
        }
        times = time_interleaved(list(groups.values()), args.replays, 2 * max(len(lays), nw))
        row = {"N": n, "K": k}
        for name, us in zip(groups, times):
            row[f"{name}_us"] = us
            row[f"{name}_GBps"] = moved[name] / us / 1e3
        rows.append(row)
        print(f"{n}x{k}: " + ", ".join(f"{g} {row[g + '_us']:.2f} us ({row[g + '_GBps']:.0f} GB/s)" for g in groups),
              flush=True)
        del groups, lays, src, dst, quarter
        torch.cuda.empty_cache()
    write_probe_results(args.out or Path(__file__).resolve().parents[1] / "results" / f"write-rate-{card_name()}.json",
                        rows, __doc__)


if __name__ == "__main__":
    main()
