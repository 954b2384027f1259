"""Stall samples of an ncu source-page CSV (benchmarks/ncu_source.sh) by region of v1's SASS, in code order: before
the first LDGSTS (the prologue), from there to the first HMMA (ring fill, ortho-first work), to the last HMMA (the
sweep), after it (the epilogue); per region the samples, warp instructions executed and top stall reasons, then the
prologue's top instructions. (Code order is not execution order: read the regions as places, not phases.)

    python benchmarks/ncu_regions.py src_4096x4096.csv
"""
from __future__ import annotations

import sys

from ncu_top import SAMPLES, num, reasons, sections, top


def regions(rows: list[dict]) -> tuple[dict[str, list[dict]], int]:
    """Rows split at the first LDGSTS and the first and last HMMA (all into the prologue when there are none)."""
    src = [r["Source"] for r in rows]
    first_ld = next((i for i, s in enumerate(src) if "LDGSTS" in s), 0)
    mmas = [i for i, s in enumerate(src) if "HMMA" in s] or [first_ld]
    return {"prologue": rows[:first_ld], "fill": rows[first_ld:mmas[0]], "sweep": rows[mmas[0]:mmas[-1] + 1],
            "epilogue": rows[mmas[-1] + 1:]}, first_ld


def main() -> None:
    for i, rows in enumerate(sections(open(sys.argv[1]).read())):
        parts, first_ld = regions(rows)
        total = sum(num(r[SAMPLES]) for r in rows)
        print(f"== kernel {i}: {total:.0f} samples; first LDGSTS at row {first_ld}")
        for name, rs in parts.items():
            samples = sum(num(r[SAMPLES]) for r in rs)
            executed = sum(num(r["Instructions Executed"]) for r in rs)
            print(f"  {name:9} {samples:6.0f} samples ({100 * samples / max(total, 1):4.1f} %), {executed:9.0f} warp "
                  f"instr; {reasons(rs, 5)}")
        print("\n".join("    " + line for line in top(parts["prologue"], 8)))


if __name__ == "__main__":
    main()
