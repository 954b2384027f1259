"""Can the prefill path hide its dequantize step under the GEMM? (GPU machine)

At M >= 32 a layer dequantizes its base into a bf16 W (one kernel, bound by writing W) and then calls cuBLAS
(bound by the tensor cores at M = 512). The two stress different units, yet they run one after the other. Here
W is dequantized in row slices on a side stream while the main stream multiplies the slices already done, so
that, if the GPU runs both at once, the step costs about one slice of dequantization plus the GEMM. Variants,
each against bf16 F.linear timed in the same run (cold weights rotating beyond 4x L2, CUDA graphs, medians):

    seq          dequantize all of W, then F.linear (what the op does today)
    seq_t        the same, the product as y^T = W x^T (the layout the sliced forms write)
    split<S>     S row slices, dequantize and product one after the other on one stream (the cost of slicing)
    overlap<S>   S row slices, dequantize on a side stream, products on the main one (the overlap)

alpha = 0 (the ortho merge is a separate question). Results go to benchmarks/results/prefill-overlap-<card>.json.
If overlap<S> comes out well below seq, the op can take the pipelined form (cuBLAS can write y's column slices
in place with ldc = N, so the transposed output here is only the probe's shortcut).

    PYTHONPATH=src python benchmarks/probes/prefill_overlap.py [--m 512 2048] [--slices 2 4]
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1024, 4096)]


def row_slices(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive row ranges covering [0, n), cut at multiples of 16 (the packed base's strips)."""
    strips = -(-n // 16)
    parts = max(1, min(parts, strips))
    cuts = [round(i * strips / parts) * 16 for i in range(parts + 1)]
    cuts[-1] = n
    return [(a, b) for a, b in zip(cuts, cuts[1:])]


def slice_operands(lay, n0: int, n1: int) -> dict:
    """The packed operands of rows [n0, n1) of an OrthoLinear (n0 a multiple of 16), as the op takes them: the
    base's strips, their scales and zeros, and the rows' CSR entries with row_ptr rebased to 0."""
    s0, s1 = n0 // 16, -(-n1 // 16)
    rp = lay.row_ptr[n0:n1 + 1]
    e0, e1 = int(rp[0]), int(rp[-1])
    return {"qweight": lay.qweight[s0:s1], "scales": lay.scales[s0:s1],
            "zeros": None if lay.zeros is None else lay.zeros[s0:s1],
            "row_ptr": (rp - e0).to(lay.row_ptr.dtype).contiguous(), "col_idx": lay.col_idx[e0:e1],
            "values": lay.values[e0:e1], "N": n1 - n0}


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options both prefill probes take (prefill_carveout.py adds its own)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="*", default=[512])
    ap.add_argument("--slices", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES])
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--out", default=None)
    return ap


def rotating_copies(n: int, k: int, device: str = "cuda"):
    """A random bf16 W (n, k), its INT4 g128 OrthoLinear without ortho entries, the layer's effective group size,
    and enough copies of each to rotate beyond 4x L2 (bench_kernels' rule): (ws, lays, group_size)."""
    import torch

    from libortho import quant
    from libortho.eval import bench_kernels as bk
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    lay = bk._ortho_layer(w, 4, 128, 0.0)
    lays = [lay] + [bk._clone_layer(lay) for _ in range(bk._copies(bk._layer_bytes(lay, 0.0)) - 1)]
    ws = [w] + [w.clone() for _ in range(bk._copies(n * k * 2) - 1)]
    return ws, lays, quant.effective_group_size(lay.group_size, k)


def timed_row(groups: dict, nkm: tuple, errs: dict, replays: int, calls: int, note: str = "") -> dict:
    """Time every group of calls in one interleaved run, print the line against bf16 (the group "bf16") and return
    the row: N, K, M, <group>_us, the errors of the sliced forms."""
    from libortho.eval.bench_kernels import time_interleaved
    times = time_interleaved(list(groups.values()), replays, calls)
    n, k, m = nkm
    row = {"N": n, "K": k, "M": m, **{f"{g}_us": t for g, t in zip(groups, times)}, "rel_err_vs_seq": errs}
    bf = row["bf16_us"]
    print(f"{n}x{k} M={m}: bf16 {bf:.2f} us; " + ", ".join(
        f"{g} {row[g + '_us']:.2f} ({row[g + '_us'] / bf:.2f}x)" for g in groups if g != "bf16")
        + note + f"; max rel err {max(errs.values(), default=0):.1e}", flush=True)
    return row


def main() -> None:
    import torch
    import torch.nn.functional as F

    from libortho.eval.bench_kernels import card_name, write_probe_results
    from libortho.ops import cuda as cuda_ops

    args = probe_parser(__doc__).parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    ext = cuda_ops.extension()
    side = torch.cuda.Stream()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        ws, lays, gs = rotating_copies(n, k)
        full = [slice_operands(a, 0, n) for a in lays]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            yt = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)

            def deq(op):
                return cuda_ops._checked(ext.dequant_merge(x, op["qweight"], op["scales"], op["zeros"], op["row_ptr"],
                                                           op["col_idx"], op["values"], 0.0, 4, gs, op["N"], k))

            def sliced(ops, bounds, overlap):
                def run():
                    main_s = torch.cuda.current_stream()
                    if overlap:
                        side.wait_stream(main_s)
                    done = []
                    with torch.cuda.stream(side) if overlap else contextlib.nullcontext():
                        for op in ops:
                            wi = deq(op)
                            ev = torch.cuda.Event()
                            ev.record()
                            done.append((wi, ev))
                    for (n0, n1), (wi, ev) in zip(bounds, done):
                        if overlap:
                            main_s.wait_event(ev)
                        torch.mm(wi, x.t(), out=yt[n0:n1])
                    if overlap:  # the slices (allocated on the side stream) are freed only after this join
                        main_s.wait_stream(side)
                    return yt
                return run

            groups = {"bf16": [lambda wi=wi: F.linear(x, wi) for wi in ws],
                      "seq": [lambda op=op: F.linear(x, deq(op)) for op in full],
                      "seq_t": [lambda op=op: torch.mm(deq(op), x.t(), out=yt) for op in full]}
            for s in args.slices:
                bounds = row_slices(n, s)
                ops = [[slice_operands(a, n0, n1) for n0, n1 in bounds] for a in lays]
                groups[f"split{s}"] = [sliced(o, bounds, False) for o in ops]
                groups[f"overlap{s}"] = [sliced(o, bounds, True) for o in ops]
            ref = F.linear(x, deq(full[0])).float()
            errs = {}
            for name in groups:
                if name.startswith(("split", "overlap")):
                    got = groups[name][0]().t().float()
                    errs[name] = float((got - ref).norm() / ref.norm())
            rows.append(timed_row(groups, (n, k, m), errs, args.replays, 2 * max(len(lays), len(ws))))
        del lays, ws, full
        torch.cuda.empty_cache()
    write_probe_results(args.out or Path(__file__).resolve().parents[1] / "results" / f"prefill-overlap-{card_name()}.json",
                        rows, __doc__)


if __name__ == "__main__":
    main()
