"""Stall samples of an ncu source-page CSV (benchmarks/ncu_source.sh) by region of v1's SASS, in code order: before
the first LDGSTS (the prologue), from there to the first HMMA (ring fill, ortho-first work), to the last HMMA (the
sweep), after it (the epilogue); per region the samples, warp instructions executed and top stall reasons, then the
prologue's top instructions. (Code order is not execution order: read the regions as places, not phases.)

    python benchmarks/ncu_regions.py src_4096x4096.csv
"""
import csv, io, sys
S = "Warp Stall Sampling (All Samples)"
num = lambda v: float((v or "0").replace(",", ""))
text = open(sys.argv[1]).read()
for ki, part in enumerate(text.split('"Kernel Name"')[1:]):
    rows = list(csv.DictReader(io.StringIO(part.split("\n", 1)[1])))
    src = [r["Source"] for r in rows]
    first_ld = next((i for i, s in enumerate(src) if "LDGSTS" in s), 0)
    mmas = [i for i, s in enumerate(src) if "HMMA" in s]
    first_mma, last_mma = (mmas[0], mmas[-1]) if mmas else (first_ld, first_ld)
    regions = {"prologue": rows[:first_ld], "fill": rows[first_ld:first_mma], "sweep": rows[first_mma:last_mma + 1],
               "epilogue": rows[last_mma + 1:]}
    total = sum(num(r[S]) for r in rows)
    print(f"== kernel {ki}: {total:.0f} samples; first LDGSTS at row {first_ld}, HMMA rows {first_mma}-{last_mma}")
    for name, rs in regions.items():
        samp = sum(num(r[S]) for r in rs)
        ex = sum(num(r["Instructions Executed"]) for r in rs)
        reasons = {}
        for r in rs:
            for k, v in r.items():
                if k and k.startswith("stall_") and "Not Issued" not in k:
                    reasons[k[6:]] = reasons.get(k[6:], 0) + num(v)
        best = ", ".join(f"{k} {v:.0f}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:5] if v)
        print(f"  {name:9} {samp:6.0f} samples ({100 * samp / max(total, 1):4.1f} %), {ex:9.0f} warp instr; {best}")
    top = sorted(rows[:first_ld], key=lambda r: -num(r[S]))[:8]
    for r in top:
        reasons = {k[6:]: num(v) for k, v in r.items() if k and k.startswith("stall_") and "Not Issued" not in k}
        best = ", ".join(f"{k} {v:.0f}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3] if v)
        print(f"    {num(r[S]):5.0f} {r.get('Address', '')} {r['Source'].strip()[:60]:60} {best}")
