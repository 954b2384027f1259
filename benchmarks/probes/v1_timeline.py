"""Where a v1 launch at M = 1 spends its time (GPU machine, a diagnostic build): each warp's lane 0 stamps
%globaltimer (ns; 256 ns steps on the H200) and clock64 at 0 entry, 1 before the ring sweep, 2 its first tile in shared
memory, 3 sweep done, 4 after the block barrier, 5 end; slot 7 = SM id. Each case: one call after an L2 flush, 9
times, the run of median span kept; next to it the same call's time in the kernel bench's graph harness.

    git apply benchmarks/probes/v1_timeline.patch      # the stamps (kernels.h, binding.cpp, v1.cuh); never on main
    PYTHONPATH=src python benchmarks/probes/v1_timeline.py benchmarks/results/v1-timeline-<card>.json
    git apply -R benchmarks/probes/v1_timeline.patch
"""
import json
import os
import statistics
import sys

import torch
from libortho.eval.bench_kernels import _ortho_layer, _layer_call, time_rotating, _clone_layer, _copies, _layer_bytes
from libortho.ops import cuda

cuda.build()
ext = cuda._state["ext"]
flush = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
out = {"card": torch.cuda.get_device_name(), "cases": []}
SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ.get(
    "SHAPES", "4096x4096 11008x4096 4096x11008 1024x4096 12288x4096 22016x4096 4096x14336").split()]
CFGS = [None if c == "table" else int(c) for c in os.environ.get("CFGS", "table 16 17 19 20 25 8").split()]
RAW = os.environ.get("RAW") == "1"  # also keep each warp's stamps of the median run (relative ns, SM id)


def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]


def warp_stats(v):
    """Quantiles over the warps of one run's stamps (rows: warps; columns as in the module docstring), in ns."""
    t, c = v[:, :6].double(), v[:, 8:14].double()
    t0 = t[:, 0].min()
    qs = lambda x, ps: [float(q(x.tolist(), p)) for p in ps]  # noqa: E731
    return {"warps": len(v), "span_ns": float(t[:, 5].max() - t0),
            "start": qs(t[:, 0] - t0, (0.5, 0.9, 1.0)),
            "setup": float(statistics.median((t[:, 1] - t[:, 0]).tolist())),
            "first": qs(t[:, 2] - t[:, 1], (0.1, 0.5, 0.9)),
            "sweep": qs(t[:, 3] - t[:, 2], (0.1, 0.5, 0.9, 1.0)),
            "sweep_cyc": qs(c[:, 3] - c[:, 2], (0.1, 0.5, 0.9)),
            "bar": qs(t[:, 4] - t[:, 3], (0.5, 0.9)),
            "epi": qs(t[:, 5] - t[:, 4], (0.5, 0.9)),
            "end": qs(t[:, 5] - t0, (0.1, 0.5, 0.9, 1.0)),
            "sweep_start_end": qs(t[:, 3] - t0, (0.5, 0.9, 1.0)),
            "sms": int(v[:, 7].unique().numel()),
            "warps_per_sm_max": int(torch.bincount(v[:, 7]).max())}


def call(lay, x, a, cfg):
    if cfg is None:
        return _layer_call(lay, x, a)
    return lambda: ext.fused_small_m_cfg(x, lay.qweight, lay.scales, lay.zeros, lay.row_ptr, lay.col_idx, lay.values,
                                         None, a, 4, lay.group_size, lay.out_features, lay.in_features, cfg)


tl = torch.zeros(8192 * 16 * 16, dtype=torch.int64, device="cuda")
none = torch.empty(0, dtype=torch.int64, device="cuda")
for n, k in SHAPES:
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    lays = {0.0: _ortho_layer(w, 4, 128, 0.0), 0.01: _ortho_layer(w, 4, 128, 0.01)}
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for d, a in ((0.0, 0.0), (0.01, 1.0)):
        lay = lays[d]
        for cfg in CFGS:
            if cfg is not None and (n, k) not in ((4096, 4096), (11008, 4096)):
                continue
            f = call(lay, x, a, cfg)
            try:
                f()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print("skip", n, k, cfg, e)
                continue
            # graph timing with the timeline off (same harness as the kernel bench)
            nq = _copies(_layer_bytes(lay, a))
            cs = [lay] + [_clone_layer(lay) for _ in range(nq - 1)]
            t_graph = time_rotating([call(c, x, a, cfg) for c in cs], 10, max(2 * nq, 24))
            del cs
            reps = []
            for _ in range(9):
                tl.zero_()
                flush.max()  # evicts L2
                torch.cuda.synchronize()
                ext.set_timeline(tl)
                f()
                ext.set_timeline(none)
                torch.cuda.synchronize()
                v = tl.view(-1, 16).cpu()
                reps.append(v[v[:, 0] != 0])
            stats = [warp_stats(v) for v in reps]
            mid = sorted(range(len(stats)), key=lambda i: stats[i]["span_ns"])[len(stats) // 2]
            med = stats[mid]
            if RAW:  # each warp's stamps of the median run, relative to its first start
                t, c = reps[mid][:, :6], reps[mid][:, 8:14]
                med["raw"] = {"t": (t - t[:, 0].min()).tolist(), "cyc": (c - c[:, :1]).tolist(), "sm": reps[mid][:, 7].tolist()}
            out["cases"].append({"N": n, "K": k, "density": d, "alpha": a, "cfg": cfg, "graph_us": t_graph,
                                 "median_rep": med, "spans": sorted(s["span_ns"] for s in stats)})
            print(f"{n}x{k} a={a} cfg={cfg}: graph {t_graph:.2f} us; span {med['span_ns']:.0f} ns; warps {med['warps']} sms {med['sms']} "
                  f"maxw/sm {med['warps_per_sm_max']}; start p50/p90/max {med['start']}; setup {med['setup']:.0f}; "
                  f"first p10/50/90 {med['first']}; sweep p10/50/90/max {med['sweep']} cyc {med['sweep_cyc']}; "
                  f"bar {med['bar']}; epi {med['epi']}; end p10/50/90/max {med['end']}", flush=True)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/out/tl.json", "w"), indent=1)
