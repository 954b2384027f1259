"""Can the prefill path's dequantize step run beside the GEMM on SMs the GEMM leaves free? (GPU machine)

prefill_overlap.py found no overlap: cuBLAS at M >= 512 takes every SM, so a dequantize kernel on a side
stream waits for it. Here the GEMMs of all slices but the last are told to use fewer SMs (cuBLASLt's SM count
target, set by torch's experimental SM carveout), so that the next slice's dequantize runs on the SMs left
over. The GEMM is compute-bound and the dequantize bound by memory, so sharing the SMs could hide most of
the step. Variants, each against bf16 F.linear timed in the same run (cold weights rotating beyond 4x L2,
CUDA graphs, medians; alpha = 0):

    bf16, bf16_lt     F.linear on bf16 W (torch's default BLAS; cuBLASLt)
    gemm_c<C>         F.linear on bf16 W on all SMs but C (what the carveout costs the GEMM alone)
    seq               dequantize all of W, then F.linear (what the op does today)
    kpipe<S>c<C>      W cut in S column slices (whole quantization groups); slice 0 dequantized on all SMs,
                      the others on a side stream while the main stream accumulates x_s W_s^T in fp32 with
                      C SMs carved out (the last product on all SMs), then one cast to bf16
    npipe<S>c<C>      the same with row slices (whole 16-row strips): products write y^T's rows, no fp32 sum

Results go to benchmarks/results/prefill-carveout-<card>.json. If a pipelined form beats seq by a clear margin
the op can take it for M >= 512 (the carveout is per cuBLASLt call, so the op would set it on its own call).

    PYTHONPATH=src python benchmarks/probes/prefill_carveout.py [--m 512 2048] [--slices 2 4] [--carveout 16 32]
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_overlap import probe_parser, rotating_copies, row_slices, slice_operands, timed_row  # noqa: E402


def column_cuts(k: int, group_size: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive column ranges covering [0, k), cut at multiples of the group size (and so of the
    64-column tiles when the group size is a multiple of 64)."""
    groups = -(-k // group_size)
    parts = max(1, min(parts, groups))
    cuts = [round(i * groups / parts) * group_size for i in range(parts + 1)]
    cuts[-1] = k
    return [(a, b) for a, b in zip(cuts, cuts[1:])]


def column_operands(lay, k0: int, k1: int, tile_k: int = 64) -> dict:
    """The packed base of columns [k0, k1) of an OrthoLinear without ortho entries (k0 a multiple of the group
    size and of the tile width): its tiles, scales and zeros, with an empty CSR."""
    import torch
    t0, t1 = k0 // tile_k, -(-k1 // tile_k)
    g0, g1 = k0 // lay.group_size, -(-k1 // lay.group_size)
    return {"qweight": lay.qweight[:, t0:t1].contiguous(), "scales": lay.scales[:, g0:g1].contiguous(),
            "zeros": None if lay.zeros is None else lay.zeros[:, g0:g1].contiguous(),
            "row_ptr": torch.zeros(lay.out_features + 1, dtype=lay.row_ptr.dtype, device=lay.row_ptr.device),
            "col_idx": lay.col_idx[:0], "values": lay.values[:0], "N": lay.out_features, "K": k1 - k0}


@contextlib.contextmanager
def blas(carveout):
    """cuBLASLt for the products inside, on all SMs but `carveout` (None: all SMs)."""
    import torch
    prev_lib, prev_c = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(prev_c)
        torch.backends.cuda.preferred_blas_library(prev_lib)


def accumulates_in_place(x, y32) -> bool:
    """Whether torch's addmm with out_dtype = float32 adds bf16 products into an fp32 output in place (beta = 1)."""
    import torch
    w = torch.randn(64, x.shape[1], device=x.device, dtype=x.dtype)
    acc = torch.randn(x.shape[0], 64, device=x.device)
    want = acc + torch.mm(x, w.t(), out_dtype=torch.float32)
    try:
        torch.addmm(acc, x, w.t(), out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError) as e:
        print(f"addmm(out_dtype=float32, out=acc) not available ({str(e).splitlines()[0]}): separate add")
        return False
    return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from libortho.eval.bench_kernels import card_name, write_probe_results
    from libortho.ops import cuda as cuda_ops

    ap = probe_parser(__doc__)
    ap.add_argument("--carveout", type=int, nargs="*", default=[16, 32])
    args = ap.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    ext = cuda_ops.extension()
    side = torch.cuda.Stream()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        ws, lays, gs = rotating_copies(n, k)
        full = [slice_operands(a, 0, n) | {"K": k} for a in lays]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            yt = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)
            y32 = torch.empty(m, n, device="cuda", dtype=torch.float32)

            def deq(op):
                return cuda_ops._checked(ext.dequant_merge(x, op["qweight"], op["scales"], op["zeros"], op["row_ptr"],
                                                           op["col_idx"], op["values"], 0.0, 4, gs, op["N"], op["K"]))

            def pipelined(ops, product, carveout, finish):
                def run():
                    main_s = torch.cuda.current_stream()
                    done = [(deq(ops[0]), None)]
                    side.wait_stream(main_s)
                    with torch.cuda.stream(side):
                        for op in ops[1:]:
                            ev = torch.cuda.Event()
                            done.append((deq(op), ev))
                            ev.record()
                    for i, (wi, ev) in enumerate(done):
                        if ev is not None:
                            main_s.wait_event(ev)
                        with blas(carveout if i < len(done) - 1 else None):
                            product(i, wi)
                    main_s.wait_stream(side)  # the slices (allocated on the side stream) are freed after this join
                    return finish()
                return run

            def kpipe(ops, cuts, carveout):
                def product(i, wi):
                    k0, k1 = cuts[i]
                    if fused_sum:  # cuBLAS adds into y32 itself (beta = 1)
                        torch.addmm(y32, x[:, k0:k1], wi.t(), beta=0 if i == 0 else 1, out_dtype=torch.float32, out=y32)
                    elif i == 0:
                        torch.mm(x[:, k0:k1], wi.t(), out_dtype=torch.float32, out=y32)
                    else:
                        y32.add_(torch.mm(x[:, k0:k1], wi.t(), out_dtype=torch.float32))
                return pipelined(ops, product, carveout, lambda: y32.to(torch.bfloat16))

            def npipe(ops, bounds, carveout):
                def product(i, wi):
                    n0, n1 = bounds[i]
                    torch.mm(wi, x.t(), out=yt[n0:n1])
                return pipelined(ops, product, carveout, lambda: yt.t())

            def lt(fn, carveout=None):
                def run():
                    with blas(carveout):
                        return fn()
                return run

            fused_sum = accumulates_in_place(x, y32)
            groups = {"bf16": [lambda wi=wi: F.linear(x, wi) for wi in ws],
                      "bf16_lt": [lt(lambda wi=wi: F.linear(x, wi)) for wi in ws]}
            for c in args.carveout:
                groups[f"gemm_c{c}"] = [lt(lambda wi=wi: F.linear(x, wi), c) for wi in ws]
            groups["seq"] = [lambda op=op: F.linear(x, deq(op)) for op in full]
            for s in args.slices:
                cuts, bounds = column_cuts(k, gs, s), row_slices(n, s)
                kops = [[column_operands(a, k0, k1) for k0, k1 in cuts] for a in lays]
                nops = [[slice_operands(a, n0, n1) | {"K": k} for n0, n1 in bounds] for a in lays]
                for c in args.carveout:
                    groups[f"kpipe{s}c{c}"] = [kpipe(o, cuts, c) for o in kops]
                    groups[f"npipe{s}c{c}"] = [npipe(o, bounds, c) for o in nops]
            ref = F.linear(x, deq(full[0])).float()
            errs = {name: float((fns[0]().float() - ref).norm() / ref.norm())
                    for name, fns in groups.items() if name.startswith(("kpipe", "npipe"))}
            rows.append(timed_row(groups, (n, k, m), errs, args.replays, 2 * max(len(lays), len(ws))))
        del lays, ws, full
        torch.cuda.empty_cache()
    write_probe_results(args.out or Path(__file__).resolve().parents[1] / "results" / f"prefill-carveout-{card_name()}.json",
                        rows, __doc__)


if __name__ == "__main__":
    main()
