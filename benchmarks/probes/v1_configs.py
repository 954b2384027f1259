"""Tuning probe of the v1 decode kernel (GPU machine): each configuration of v1_configs.cu's fused_cfg_dispatch
(K tiles per chunk, x fragments fetched with the chunk or not, occupancy floor) checked against a float64
reference and timed at M = 1, 4, 8, 16 (each where the configuration supports it) in the kernel bench's harness (CUDA graph of back-to-back calls over
weight copies beyond 4x L2, median per call), next to bf16 F.linear and torch's int4 kernel.

    PYTHONPATH=src python benchmarks/probes/v1_configs.py     # writes benchmarks/results/v1-configs-<card>.json

It also suggests the table of configurations per class of call (cuda.V1_CLASSES, v1.cu g_v1_table):
for each class, the configuration with the least alpha 0 + alpha 1 time summed over the class's rows, among
those correct on all of them; the JSON's "suggested" holds it as a $LIBORTHO_V1_CFG value. Offline (no GPU), a
saved probe's suggestion under this checkout's classes, with the runners-up per class:

    PYTHONPATH=src python benchmarks/probes/v1_configs.py --suggest-from benchmarks/results/v1-configs-H200-warps.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from libortho.eval.bench_kernels import _clone_layer, _copies, _layer_bytes, _ortho_layer, _torch_int4, card_name, time_rotating
from libortho.ops import cuda as cuda_ops

CONFIGS = ["kU2 pfx min2 (short grids)", "kU1 pfx min3 (tall grids)", "kU1 pfx min2",
           "ring6 min2", "ring6 min3", "ring4 min3",  # ring: weights via a shared-memory ring (kStages)
           "m16 default", "m16 ring5 min2",           # the M <= 16 kernel (two n8 column blocks)
           "ring4 min3 x-ring",                       # x's tile columns through the ring too (M <= 4)
           "ring4 min3 x-ring8", "m16 ring4 min2 x-ring16",  # ... M <= 8 and 16 (dynamic shared memory)
           "ring4 min2 x-ring8 32 rows", "m16 ring3 min2 x-ring16 32 rows",  # two row tiles per block
           "ring4 min3 x-ring ortho-first", "ring4 min3 x-ring8 ortho-first",  # ortho stream during the ring's fill
           "ring4 min2 x-ring8 32 rows ortho-first", "ring4 min2 x-ring ortho-first",
           "w12 ring4 min2 x-ring", "w12 ring4 min2 x-ring8", "w12 ring4 min2 x-ring ortho-first",  # 12 warps
           "w16 ring4 min1 x-ring8 32 rows", "w16 ring4 min1 x-ring8 32 rows ortho-first",  # 16 warps
           "w16 m16 ring3 min1 x-ring16 32 rows",
           "ring4 min3 x-ring 32 rows", "ring3 min3 x-ring8 32 rows", "ring3 min3 x-ring 32 rows",  # 3 blocks per SM
           "m32 ring4 min1 x-ring32", "m32 ring3 min1 x-ring32 32 rows", "m32 ring2 min2 x-ring32",  # M <= 32
           "m32 ring3 min1 x-ring32", "m64 ring2 min1 x-ring64",  # M <= 64
           "m64 ring2 min1 x-ring64 32 rows sums-in-ring", "m32 ring4 min1 x-ring32 32 rows sums-in-ring"]
MAX_M = list(cuda_ops.V1_CONFIG_MAX_M)
assert len(MAX_M) == len(CONFIGS)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1024, 4096)]


HEAVY_ORTHO = 1 << 20  # v1.cu kHeavyOrtho


def v1_class(n: int, k: int, m: int, sms: int, ortho_nnz: int = 0) -> str:
    """The class of a call in v1.cu's table (v1_class there); ortho_nnz counts only at alpha != 0 (and, on a tall
    grid, only at m >= 2)."""
    heavy = ortho_nnz >= HEAVY_ORTHO
    if m > 32:  # the table runs the base there (cuda.use_v1_wide picks the shapes); an ortho stream is added after it
        return "m64"
    if m > 16:  # the table runs the base there; an ortho stream is added after it (v1.cu fused_dispatch_nt)
        return "m32_tiny" if (n + 15) // 16 < sms else "m32"
    if m > 8:
        return "m16_tall" if (n + 15) // 16 >= 3 * sms and not heavy else "m16_long_k" if k >= 8192 else "m16"
    if (n + 15) // 16 >= 3 * sms and not (heavy and m > 1):
        return "tall_m4" if m <= 4 else "tall_m8"
    if (n + 15) // 16 < sms:
        return "tiny"
    if m > 4:
        return "short_m8"
    return "short_long_k" if k >= 8192 and not heavy else "short_m4"


def class_costs(rows: list[dict], configs: list[str], sms: int) -> dict[str, dict[int, float]]:
    """{class: {configuration index: alpha 0 + alpha 1 us summed over the class's calls}} for the configurations
    that may serve the class and are correct on all of its rows. A row's alpha 0 and alpha 1 calls count in
    their own calls' classes (which differ for a heavy ortho stream on a tall grid); above M = 16 only alpha 0
    (the table runs only the base there: the ortho add follows it, not the configuration's own ortho stream)."""
    allowed = cuda_ops._V1_CLASS_CONFIGS
    by_class: dict[str, list[tuple[dict, str]]] = {}
    for r in rows:
        for key, nnz in (("alpha0_us", 0), ("alpha1_us", r.get("ortho_nnz", 0)))[:1 if r["M"] > 16 else 2]:
            by_class.setdefault(v1_class(r["N"], r["K"], r["M"], sms, nnz), []).append((r, key))
    costs = {}
    for cls, calls in by_class.items():
        cost = {}
        for i in allowed[cls]:
            name = configs[i] if i < len(configs) else None
            if name is not None and all(name in r and r[name]["ok"] for r, _ in calls):
                cost[i] = sum(r[name][key] for r, key in calls)
        costs[cls] = cost
    return costs


def suggest_table(rows: list[dict], configs: list[str], sms: int) -> dict[str, int]:
    """{class: configuration index} for the classes the rows cover (see the module docstring): the least summed
    time of class_costs."""
    return {cls: min(cost, key=cost.get) for cls, cost in class_costs(rows, configs, sms).items() if cost}


def suggestion_report(result: dict, sms: int, top: int = 4) -> str:
    """A saved probe's table again, offline (--suggest-from): per class the `top` configurations by summed
    time, each with its ratio to the best, under the class rules of this checkout."""
    lines = []
    for cls, cost in sorted(class_costs(result["rows"], result["configs"], sms).items()):
        if not cost:
            lines.append(f"{cls}: no configuration correct on all its rows")
            continue
        best = min(cost.values())
        ranked = sorted(cost, key=cost.get)[:top]
        lines.append(f"{cls}: " + ", ".join(f"{i} {result['configs'][i]} {cost[i]:.2f} us ({cost[i] / best:.3f})"
                                           for i in ranked))
    return "\n".join(lines)


def call(ext, layer, x, alpha, cfg):
    return cuda_ops._checked(ext.fused_small_m_cfg(x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr,
                                                   layer.col_idx, layer.values, None, alpha, 4, layer.group_size,
                                                   layer.out_features, layer.in_features, cfg), f"config {cfg}")


def rel_err(layer, x, alpha, y) -> float:
    w = layer.base_weight().double()
    if alpha and layer.ortho_nnz:
        w = w + alpha * layer.ortho().to_dense().double()
    ref = x.double() @ w.t()
    return float((y.double() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES],
                    help="NxK (out x in); the decode's fused siblings are 12288x4096 (q/k/v) and 22016x4096 (gate/up)")
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--configs", type=int, nargs="*", default=None, help="indices to time (default: all)")
    ap.add_argument("--density", type=float, default=0.01, help="ortho density of the alpha 1 calls")
    ap.add_argument("--lean", choices=["on", "off"], default=None,
                    help="ring configurations run their lean kernels where the call allows (set_v1_lean; default: as built)")
    ap.add_argument("--suggest-from", default=None, metavar="JSON",
                    help="no GPU: the table a saved probe suggests under this checkout's classes, with the runners-up")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the card of --suggest-from (H100/H200: 132)")
    args = ap.parse_args()
    if args.suggest_from:
        print(suggestion_report(json.loads(Path(args.suggest_from).read_text()), args.sms))
        return
    assert cuda_ops.build(), cuda_ops._state["error"]
    ext = cuda_ops.extension()
    if args.lean is not None:
        ext.set_v1_lean(args.lean == "on")
    rows = []
    for n, k in (tuple(int(v) for v in s.lower().split("x")) for s in args.shapes):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        base = _ortho_layer(w, 4, 128, args.density)
        nq, nw = _copies(_layer_bytes(base, 1.0)), _copies(n * k * 2)
        layers = [base] + [_clone_layer(base) for _ in range(nq - 1)]
        ws = [w] + [w.clone() for _ in range(nw - 1)]
        calls = max(2 * nq, 2 * nw, 24)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "ortho_nnz": base.ortho_nnz, "bf16_us": time_rotating([lambda wi=wi: F.linear(x, wi) for wi in ws],
                                                                    args.replays, calls)}
            int4 = _torch_int4(w, 128, x)
            if int4 is not None:
                packs = [int4[0]] + [int4[0].clone() for _ in range(nq - 1)]
                row["torch_int4_us"] = time_rotating(
                    [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p, 128, int4[1]) for p in packs], args.replays, calls)
            names = [c for i, (c, mm) in enumerate(zip(CONFIGS, MAX_M))  # the M 17-64 kernels only above 16
                     if m <= mm and (mm <= 16) == (m <= 16) and (args.configs is None or i in args.configs)]
            for cfg, name in enumerate(CONFIGS):
                if name not in names:
                    continue
                errs = [rel_err(base, x, a, call(ext, base, x, a, cfg)) for a in (0.0, 1.0)]
                t = [time_rotating([lambda lay=lay, a=a: call(ext, lay, x, a, cfg) for lay in layers], args.replays, calls)
                     for a in (0.0, 1.0)]
                row[name] = {"alpha0_us": t[0], "alpha1_us": t[1], "rel_err": max(errs), "ok": max(errs) < 1.6e-2}
            rows.append(row)
            best = min(names, key=lambda c: row[c]["alpha0_us"] if row[c]["ok"] else float("inf"))
            print(f"{n}x{k} M={m}: bf16 {row['bf16_us']:.2f} us, int4 {row.get('torch_int4_us', float('nan')):.2f}; "
                  + "; ".join(f"{c.split(' (')[0]} {row[c]['alpha0_us']:.2f}/{row[c]['alpha1_us']:.2f}"
                              + ("" if row[c]["ok"] else " WRONG") for c in names)
                  + f"; best alpha0: {best}", flush=True)
    table = suggest_table(rows, CONFIGS, torch.cuda.get_device_properties(0).multi_processor_count)
    spec = ",".join(f"{c}={i}" for c, i in table.items())
    print(f"suggested LIBORTHO_V1_CFG={spec} (in use: {cuda_ops.v1_table()})")
    out = Path(args.out or f"benchmarks/results/v1-configs-{card_name()}.json")
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "density": args.density, "configs": CONFIGS, "table_in_use": cuda_ops.v1_table(), "v1_lean": cuda_ops.v1_lean(),
                               "suggested": {"table": table, "spec": spec}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
