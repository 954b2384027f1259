"""Top stall locations of an ncu source-page CSV (benchmarks/ncu_source.sh): per profiled kernel, the total
stall samples, the warp instructions executed and the N SASS instructions with the most samples, each with
its three largest stall reasons.

    python benchmarks/ncu_top.py src_4096x11008.csv [N]
"""
from __future__ import annotations

import csv
import io
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def num(v: str) -> float:
    return float((v or "0").replace(",", ""))


def sections(text: str) -> list[list[dict]]:
    """One list of rows (dicts) per kernel in the file."""
    return [list(csv.DictReader(io.StringIO(part.split("\n", 1)[1]))) for part in text.split('"Kernel Name"')[1:]]


def reasons(rows: list[dict], n: int) -> str:
    """The n largest stall reasons summed over rows, as 'reason samples, ...'."""
    total: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k and k.startswith("stall_") and "Not Issued" not in k:
                total[k[6:]] = total.get(k[6:], 0.0) + num(v)
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:n] if v)


def top(rows: list[dict], n: int) -> list[str]:
    return [f"{num(r[SAMPLES]):6.0f}  ex {num(r['Instructions Executed']):8.0f}  {r['Source'].strip()[:58]:58}  "
            f"{reasons([r], 3)}" for r in sorted(rows, key=lambda r: -num(r[SAMPLES]))[:n]]


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15
    for i, rows in enumerate(sections(open(path).read())):
        total = sum(num(r[SAMPLES]) for r in rows)
        executed = sum(num(r["Instructions Executed"]) for r in rows)
        print(f"== kernel {i}: {total:.0f} stall samples, {executed:.0f} warp instructions executed")
        print("\n".join(top(rows, n)))


if __name__ == "__main__":
    main()
