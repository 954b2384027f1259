"""Compare two kernel-benchmark JSONs (``libortho bench kernels``; e.g. a switch off and on in one GPU call):
per row (N, K, M, density) the LibOrtho times of both runs and their ratio, each against its own run's bf16,
then the median ratio per M and the speed-up ranges the issue's goals are stated in.

    python benchmarks/compare_kernels.py A.json B.json [--key alpha0_us --key alpha1_us]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEYS = ("alpha0_us", "alpha1_us")


def paired(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """Rows of both runs with the same (N, K, M, density), in run A's order."""
    key = lambda r: (r["N"], r["K"], r["M"], r["density"])  # noqa: E731
    bs = {key(r): r for r in b["rows"]}
    return [(r, bs[key(r)]) for r in a["rows"] if key(r) in bs]


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


def median_by_m(rows: list[dict], key: str) -> dict[int, float]:
    """Median B / A time ratio of `key` per M (below 1: run B is faster)."""
    by: dict[int, list[float]] = {}
    for r in rows:
        if key in r:
            by.setdefault(r["M"], []).append(r[key][2])
    return {m: statistics.median(v) for m, v in sorted(by.items())}


def speedup_range(rows: list[dict], key: str, m: int, density: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """(min, max) speed-up over bf16 of run A and of run B at this M and density, or None."""
    v = [r[key + "_speedup"] for r in rows if r["M"] == m and r["density"] == density and key + "_speedup" in r]
    if not v:
        return None
    return (min(a for a, _ in v), max(a for a, _ in v)), (min(b for _, b in v), max(b for _, b in v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--key", action="append", default=None, help="time fields to compare (default alpha0_us, alpha1_us)")
    args = ap.parse_args()
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    keys = tuple(args.key or KEYS)
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
