"""Rebuild a kernels-<card>.json from the bench.log of ``libortho bench kernels`` when the JSON itself was
lost (e.g. not fetched back from the GPU machine). Times are the printed values (2 decimals, in us);
fields the log does not print (per-variant base-only times, nnz, alpha0 GB/s) are left out.
Usage: python benchmarks/rebuild_kernels_json.py bench.log OUT.json --card "NVIDIA H200" --torch 2.11.0+cu130 \
           --date 2026-11-28T21:00:00+00:00 --command "..." [--note "..."]"""
import argparse
import json
import re

ROW = re.compile(r"^\s*(\d+)x(\d+)\s+M=(\d+)\s+d=([\d.]+)\s+bf16\s+([\d.]+)us\s+int4\s+([\d.na]+)us\s+base\s+([\d.]+)us\s+"
                 r"a0\s+([\d.]+)us \([\d.]+x\)\s+a1\s+([\d.]+)us \([\d.]+x\)\s+(\d+) GB/s(.*)$")
VAR = re.compile(r"\[(v\d): a0\s+([\d.]+)us \([\d.]+x\) a1\s+([\d.]+)us \([\d.]+x\)\]")


def parse(lines):
    copy_gbps, rows = None, []
    for line in lines:
        m = re.search(r"device-to-device copy (\d+) GB/s", line)
        if m:
            copy_gbps = float(m.group(1))
        m = ROW.match(line)
        if not m:
            continue
        n, k, mm = (int(v) for v in m.groups()[:3])
        d, bf16, int4, base, a0, a1 = (float(v) for v in m.groups()[3:9])
        row = {"N": n, "K": k, "M": mm, "density": d, "bf16_us": bf16, "torch_int4_us": None if int4 != int4 else int4,
               "base_only_us": base, "alpha0_us": a0, "alpha1_us": a1, "alpha1_GBps": float(m.group(10)),
               "speedup_alpha0": bf16 / a0, "speedup_alpha1": bf16 / a1,
               "speedup_torch_int4": None if int4 != int4 else bf16 / int4}
        for v, v0, v1 in VAR.findall(m.group(11)):
            row.update({f"alpha0_{v}_us": float(v0), f"alpha1_{v}_us": float(v1),
                        f"speedup_alpha0_{v}": bf16 / float(v0), f"speedup_alpha1_{v}": bf16 / float(v1)})
        rows.append(row)
    return copy_gbps, rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("out")
    for key in ("card", "torch", "date", "command"):
        p.add_argument(f"--{key}", required=True)
    p.add_argument("--note", default="")
    a = p.parse_args()
    with open(a.log) as f:
        copy_gbps, rows = parse(f)
    from libortho.eval.bench_kernels import __doc__ as method
    result = {"card": a.card, "torch": a.torch, "date": a.date, "copy_GBps": copy_gbps, "method": method.strip(),
              "command": a.command, "note": a.note, "rebuilt_from_log": True, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(rows)} rows -> {a.out}")
