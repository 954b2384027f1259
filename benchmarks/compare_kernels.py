"""Compare two kernel-benchmark JSONs (``libortho bench kernels``; e.g. a switch off and on in one GPU call):
per row (N, K, M, density) the LibOrtho times of both runs and their ratio, each against its own run's bf16,
then the median ratio per M and the speed-up ranges the issue's goals are stated in.

    python benchmarks/compare_kernels.py A.json B.json [--key alpha0_us --key alpha1_us]
    python benchmarks/compare_kernels.py A1.json,A2.json,A3.json B1.json,B2.json,B3.json   # rounds run A B A B ...

With several rounds (comma-separated, A_i paired with B_i): per row B_i / A_i of every round and their mean, the median
of those means per M, and each side's own spread (max / min of its rounds' times per row, median over rows): an effect
smaller than that spread is not resolved by the call.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("alpha0_us", "alpha1_us")


def row_key(r: dict) -> tuple:
    """What makes a row the same row in two runs: (N, K, M, density)."""
    return r["N"], r["K"], r["M"], r["density"]


def paired(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """Rows of both runs with the same (N, K, M, density), in run A's order."""
    bs = {row_key(r): r for r in b["rows"]}
    return [(r, bs[row_key(r)]) for r in a["rows"] if row_key(r) in bs]


def ratio_rows(pairs, keys=KEYS) -> list[dict]:
    """{shape, M, density, <key>: (A us, B us, B / A), <key>_speedup: (A, B) over each run's bf16}."""
    out = []
    for ra, rb in pairs:
        row = {"shape": f"{ra['N']}x{ra['K']}", "M": ra["M"], "density": ra["density"]}
        for k in keys:
            if ra.get(k) and rb.get(k):
                row[k] = (ra[k], rb[k], rb[k] / ra[k])
                row[k + "_speedup"] = (ra["bf16_us"] / ra[k], rb["bf16_us"] / rb[k])
        out.append(row)
    return out


def median_by_m(rows: list[dict], key: str, ratio=lambda v: v[2]) -> dict[int, float]:
    """Median B / A time ratio of `key` per M (below 1: run B is faster); `ratio` takes it from a row's value (the
    third of (A, B, B / A) for two runs, the mean of the rounds' ratios for several)."""
    by: dict[int, list[float]] = {}
    for r in rows:
        if key in r:
            by.setdefault(r["M"], []).append(ratio(r[key]))
    return {m: statistics.median(v) for m, v in sorted(by.items())}


def speedup_range(rows: list[dict], key: str, m: int, density: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(min, max) speed-up over bf16 of run A and of run B at this M and density, or None."""
    v = [r[key + "_speedup"] for r in rows if r["M"] == m and r["density"] == density and key + "_speedup" in r]
    if not v:
        return None
    return (min(a for a, _ in v), max(a for a, _ in v)), (min(b for _, b in v), max(b for _, b in v))


def round_rows(a_runs: list[dict], b_runs: list[dict], keys=KEYS) -> list[dict]:
    """Rows present in every run: {shape, M, density, <key>: [B_i / A_i per round], <key>_spread: (A's max / min,
    B's max / min over the rounds)}."""
    if len(a_runs) != len(b_runs) or not a_runs:
        raise ValueError(f"rounds pair A_i with B_i: got {len(a_runs)} A runs and {len(b_runs)} B runs")
    runs = [{row_key(r): r for r in run["rows"]} for run in a_runs + b_runs]
    n = len(a_runs)
    out = []
    for r in a_runs[0]["rows"]:
        if not all(row_key(r) in run for run in runs):
            continue
        rs = [run[row_key(r)] for run in runs]
        row = {"shape": f"{r['N']}x{r['K']}", "M": r["M"], "density": r["density"]}
        for k in keys:
            if all(x.get(k) for x in rs):
                a, b = [x[k] for x in rs[:n]], [x[k] for x in rs[n:]]
                row[k] = [bi / ai for ai, bi in zip(a, b)]
                row[k + "_spread"] = (max(a) / min(a), max(b) / min(b))
        out.append(row)
    return out


def print_rounds(a_paths: list[str], b_paths: list[str], keys) -> None:
    a_runs, b_runs = ([json.loads(Path(p).read_text()) for p in ps] for ps in (a_paths, b_paths))
    rows = round_rows(a_runs, b_runs, keys)
    print(f"{len(a_runs)} rounds, A: {', '.join(a_paths)}; B: {', '.join(b_paths)}; {len(rows)} rows in every run")
    for r in rows:
        cells = "  ".join(f"{k[:-3]} {' '.join(f'{x:.3f}' for x in r[k])} mean {statistics.mean(r[k]):.3f}"
                          for k in keys if k in r)
        print(f"{r['shape']:>11} M={r['M']:<3} d={r['density']:<6} {cells}")
    for k in keys:
        print(f"median of mean B / A of {k} per M: "
              + ", ".join(f"M={m} {v:.3f}" for m, v in median_by_m(rows, k, statistics.mean).items()))
        sa = [r[k + "_spread"][0] for r in rows if k in r]
        sb = [r[k + "_spread"][1] for r in rows if k in r]
        if sa:
            print(f"own spread of {k} over the rounds (max / min per row, median over rows): "
                  f"A {statistics.median(sa):.4f}, B {statistics.median(sb):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="run A's JSON, or several rounds' JSONs separated by commas")
    ap.add_argument("b", help="run B's JSON, or as many rounds' JSONs as A's")
    ap.add_argument("--key", action="append", default=None, help="time fields to compare (default alpha0_us, alpha1_us)")
    args = ap.parse_args()
    keys = tuple(args.key or KEYS)
    if "," in args.a or "," in args.b:
        print_rounds(args.a.split(","), args.b.split(","), keys)
        return
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    rows = ratio_rows(paired(a, b), keys)
    print(f"A: {args.a} ({a.get('date')}), B: {args.b} ({b.get('date')}); {len(rows)} rows in both")
    for r in rows:
        cells = "  ".join(f"{k[:-3]} {r[k][0]:7.2f} -> {r[k][1]:7.2f} us ({r[k][2]:.3f})" for k in keys if k in r)
        print(f"{r['shape']:>11} M={r['M']:<3} d={r['density']:<6} {cells}")
    for k in keys:
        print(f"median B / A of {k} per M: " + ", ".join(f"M={m} {v:.3f}" for m, v in median_by_m(rows, k).items()))
    for k, m, d in (("alpha0_us", 1, 0.0), ("alpha1_us", 1, 0.01), ("alpha1_us", 1, 0.05), ("alpha0_us", 16, 0.0)):
        s = speedup_range(rows, k, m, d) if k in keys else None
        if s:
            print(f"{k[:-3]} M={m} d={d}: A {s[0][0]:.2f}-{s[0][1]:.2f}x, B {s[1][0]:.2f}-{s[1][1]:.2f}x over bf16")


if __name__ == "__main__":
    main()
