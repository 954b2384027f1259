"""Kernel microbenchmark: bf16 F.linear vs torch's int4 kernel vs LibOrtho (alpha 0 / 1 / base only).

Timing: each measurement is a CUDA graph of back-to-back calls that rotate through enough weight copies
to exceed 4x the L2 cache (so every call streams its weights from HBM), replayed several times and
timed with CUDA events; the per-call median is reported. All columns of a row are timed in the same run;
the LibOrtho graphs of a shape and M (base only, alpha 0 and alpha 1 at every density) are replayed in
turn, so clock drift over the run (the H200 slows under long large-M runs) cannot favour one column.
For M <= 16 every small-M kernel variant is timed (``*_v1_us``, ``*_v2_us``, ``*_v3_us``;
``$LIBORTHO_BENCH_VARIANTS=v1,v3`` keeps a subset); the unsuffixed LibOrtho columns are the default
variant's (``decode_kernel`` in the row names it). For larger M all variants share the dequantize +
cuBLAS path and the suffixed columns are null.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1024, 4096)]
MS = [1, 2, 4, 8, 16, 32, 64, 512]
DENSITIES = [0.0, 0.005, 0.01, 0.02, 0.05]


def add_arguments(p):
    p.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES], help="NxK (out x in)")
    p.add_argument("--m", type=int, nargs="*", default=MS)
    p.add_argument("--densities", type=float, nargs="*", default=DENSITIES)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--replays", type=int, default=15)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<card>.json)")


def card_name() -> str:
    return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")


def write_probe_results(out, rows: list, method: str, **extra) -> Path:
    """A probe's JSON next to the benchmarks': card, torch version, UTC date, the probe's own fields, its method
    (the script's docstring) and its rows. Returns the path written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               **extra, "method": method.strip(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return out


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


def _capture(fns, calls: int):
    """A CUDA graph of ``calls`` calls cycling through ``fns`` (warmed up outside the graph first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up outside the graph (lazy init, cuBLAS handles, autotuning)
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def time_interleaved(groups, replays: int, calls: int) -> list[float]:
    """Median microseconds per call for each list of functions in ``groups``: one graph per list, the
    graphs replayed in turn (round robin) so that slow drifts of the clocks hit every list alike."""
    return time_graphs([_capture(fns, calls) for fns in groups], replays, calls)


def time_graphs(graphs, replays: int, calls: int) -> list[float]:
    """Median microseconds per call of each captured graph of ``calls`` calls, the graphs replayed in turn."""
    times = [[] for _ in graphs]
    for _ in range(replays):
        for g, t in zip(graphs, times):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            torch.cuda.synchronize()
            t.append(s.elapsed_time(e) * 1e3 / calls)
    return [statistics.median(t) for t in times]


def time_rotating(fns, replays: int, calls: int) -> float:
    """Median microseconds per call of a graph running ``calls`` calls cycling through ``fns``."""
    return time_interleaved([fns], replays, calls)[0]


def _copies(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-4 * l2 // max(nbytes, 1)))


def _ortho_layer(w, bits, group_size, density):
    from .. import quant
    from ..layer import OrthoLinear
    from ..sieve import sieve
    codes, grid = quant.quantize(w.float(), bits, group_size, True, scale_dtype=torch.bfloat16)
    csr = None
    if density > 0:
        csr = sieve(w.float() - quant.dequantize(codes, grid), density, "magnitude", value_dtype=torch.bfloat16)
    return OrthoLinear.pack(codes, grid, csr, None, torch.bfloat16)


def _layer_call(layer, x, alpha):
    args = (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, None,
            alpha, layer.bits, layer.group_size, layer.out_features, layer.in_features)
    return lambda: torch.ops.libortho.ortho_linear(x, *args)


def _layer_bytes(layer, alpha) -> int:
    b = layer.storage_bytes()
    return b["base"] + b["scales"] + b["zeros"] + (b["ortho"] if alpha else 0)


def _torch_int4(w, group_size, x):
    """torch's tinygemm int4 kernel (asymmetric, bf16 scale+zero), or None if this build lacks it."""
    n, k = w.shape
    try:
        wg = w.float().reshape(n, k // group_size, group_size)
        wmin, wmax = wg.amin(-1), wg.amax(-1)
        scale = ((wmax - wmin) / 15).clamp_min(1e-6)
        q = torch.clamp(torch.round((wg - wmin[..., None]) / scale[..., None]), 0, 15).reshape(n, k).to(torch.int32)
        zero = wmin + scale * 8  # tinygemm dequant: (q - 8) * scale + zero
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        fn = lambda xx=x: torch.ops.aten._weight_int4pack_mm(xx, packed, group_size, sz)  # noqa: E731
        fn()
        return packed, sz, fn
    except Exception as e:  # noqa: BLE001
        print(f"torch int4 kernel unavailable: {e}")
        return None


def bench_shape(n, k, ms, densities, bits, group_size, replays):
    from ..ops import cuda as cuda_ops
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    nw = _copies(n * k * 2)
    ws = [w] + [w.clone() for _ in range(nw - 1)]
    base = _ortho_layer(w, bits, group_size, 0.0)
    layers = {d: _ortho_layer(w, bits, group_size, d) for d in densities if d > 0}
    nq = _copies(_layer_bytes(base, 0))
    bases = [base] + [_clone_layer(base) for _ in range(nq - 1)]
    copies = {d: [lay] + [_clone_layer(lay) for _ in range(nq - 1)] for d, lay in layers.items()}
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        calls = max(2 * nw, 2 * nq, 24)
        bf16 = time_rotating([lambda wi=wi: F.linear(x, wi) for wi in ws], replays, calls)
        int4 = _torch_int4(w, group_size, x)
        t_int4 = None
        if int4 is not None:
            packs = [int4[0]] + [int4[0].clone() for _ in range(nq - 1)]
            t_int4 = time_rotating([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p, group_size, int4[1])
                                    for p in packs], replays, calls)
        default = cuda_ops.decode_kernel()
        variants = _variants() if m <= cuda_ops.SMALL_M_MAX else (default,)
        t_base, t0s, t1s = {}, {}, {}
        try:
            for v in variants:
                cuda_ops.set_decode_kernel(v)  # the graph records the kernel chosen at capture
                ds = [d for d in densities if d != 0]
                groups = [[_layer_call(b, x, 1.0) for b in bases]]
                for d in ds:
                    groups += [[_layer_call(c, x, a) for c in copies[d]] for a in (0.0, 1.0)]
                t = time_interleaved(groups, replays, calls)
                t_base[v] = t[0]
                for i, d in enumerate(ds):
                    t0s[v, d], t1s[v, d] = t[1 + 2 * i], t[2 + 2 * i]
                if 0 in densities:
                    t0s[v, 0] = t1s[v, 0] = t_base[v]
        finally:
            cuda_ops.set_decode_kernel(None)
        for d in densities:
            lay = base if d == 0 else layers[d]
            t0, t1 = t0s[default, d], t1s[default, d]
            per_variant = {}
            for v in cuda_ops.DECODE_KERNELS:
                timed = v in variants and len(variants) > 1
                per_variant[f"base_only_{v}_us"] = t_base[v] if timed else None
                per_variant[f"alpha0_{v}_us"] = t0s[v, d] if timed else None
                per_variant[f"alpha1_{v}_us"] = t1s[v, d] if timed else None
                per_variant[f"speedup_alpha0_{v}"] = bf16 / t0s[v, d] if timed else None
                per_variant[f"speedup_alpha1_{v}"] = bf16 / t1s[v, d] if timed else None
            io = 2 * m * (k + n)
            rows.append({"N": n, "K": k, "M": m, "density": d, "bits": bits, "group_size": group_size,
                         "bf16_us": bf16, "torch_int4_us": t_int4, "base_only_us": t_base[default],
                         "alpha0_us": t0, "alpha1_us": t1, "decode_kernel": default, **per_variant,
                         "ortho_nnz": lay.ortho_nnz,
                         "bf16_GBps": (2 * n * k + io) / bf16 / 1e3,
                         "alpha0_GBps": (_layer_bytes(lay, 0) + io) / t0 / 1e3,
                         "alpha1_GBps": (_layer_bytes(lay, 1) + io) / t1 / 1e3,
                         "speedup_alpha0": bf16 / t0, "speedup_alpha1": bf16 / t1,
                         "speedup_torch_int4": None if t_int4 is None else bf16 / t_int4})
            r = rows[-1]
            extra = "".join(f"  [{v}: a0 {t0s[v, d]:7.2f}us ({bf16 / t0s[v, d]:.2f}x) a1 {t1s[v, d]:7.2f}us "
                            f"({bf16 / t1s[v, d]:.2f}x)]" for v in variants if len(variants) > 1)
            print(f"{n:>6}x{k:<6} M={m:<4} d={d:<6} bf16 {bf16:8.2f}us  int4 {t_int4 or float('nan'):8.2f}us  "
                  f"base {t_base[default]:8.2f}us  a0 {t0:8.2f}us ({r['speedup_alpha0']:.2f}x)  "
                  f"a1 {t1:8.2f}us ({r['speedup_alpha1']:.2f}x)  {r['alpha1_GBps']:.0f} GB/s{extra}", flush=True)
    return rows


def _clone_layer(layer):
    import copy
    return copy.deepcopy(layer)


def _variants() -> tuple:
    """The small-M kernels to time: all, or those in $LIBORTHO_BENCH_VARIANTS (e.g. "v1" when v2 failed its tests)."""
    import os

    from ..ops import cuda as cuda_ops
    want = os.environ.get("LIBORTHO_BENCH_VARIANTS")
    chosen = tuple(v for v in cuda_ops.DECODE_KERNELS if not want or v in want.split(","))
    return chosen or (cuda_ops.decode_kernel(),)


def run(args):
    from .. import ops
    if not torch.cuda.is_available():
        raise SystemExit("libortho bench kernels needs a CUDA GPU")
    if not ops.cuda.available():
        raise SystemExit(f"the LibOrtho CUDA kernels are not available: {ops.cuda._state['error']}")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "copy_GBps": bw / 1e9, "pdl": ops.cuda.pdl_enabled(), "v1_table": ops.cuda.v1_table(),
              "ortho_xt_min": ops.cuda.extension().ortho_xt_min() if ops.cuda.extension() else None,
              "v1_lean": ops.cuda.v1_lean(),
              "method": __doc__.strip(), "rows": rows}
    out = Path(args.out or f"benchmarks/results/kernels-{card_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for s in args.shapes:
        n, k = (int(v) for v in s.lower().split("x"))
        rows += bench_shape(n, k, args.m, args.densities, args.bits, args.group_size, args.replays)
        torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=1))  # after every shape: a cut-off run keeps what it timed
    print(f"wrote {out}")
    print(summary(result))


def summary(result) -> str:
    variants = [v for v in ("v1", "v2", "v3") if any(r.get(f"alpha0_{v}_us") is not None for r in result["rows"])]
    lines = ["| N x K | M | bf16 us | torch int4 | alpha=0 | alpha=1 @1% | alpha=1 @5% | base only |"
             + "".join(f" {v} alpha=0 | {v} alpha=1 @1% |" for v in variants),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(variants))]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["N"], r["K"], r["M"]), {})[r["density"]] = r
    for (n, k, m), d in by.items():
        r0 = d.get(0.0) or next(iter(d.values()))
        f = lambda r, key: "-" if r is None or r.get(key) is None else f"{r['bf16_us'] / r[key]:.2f}x"  # noqa: E731
        a0 = d.get(0.01, r0)
        pv = " | ".join(f"{f(a0, f'alpha0_{v}_us')} | {f(d.get(0.01), f'alpha1_{v}_us')}" for v in variants)
        lines.append(f"| {n}x{k} | {m} | {r0['bf16_us']:.1f} | {f(r0, 'torch_int4_us')} | {f(a0, 'alpha0_us')} | "
                     f"{f(d.get(0.01), 'alpha1_us')} | {f(d.get(0.05), 'alpha1_us')} | {f(r0, 'base_only_us')} |"
                     + (f" {pv} |" if variants else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    _p = argparse.ArgumentParser(description=__doc__)
    add_arguments(_p)
    run(_p.parse_args())
