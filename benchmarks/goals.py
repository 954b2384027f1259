"""The speed goals of the kernel and decode issues against measured results (CPU only): one row per goal with the rows
it covers, the measured range, and whether every covered row meets it; the card and dates of the files read.

    python benchmarks/goals.py   # results/kernels-H200.json + the decode file in DECODE; writes results/goals-H200.md
    python benchmarks/goals.py --kernels K.json --decode D.json --out goals.md   # e.g. an H100's run
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))  # Llama-2-7B's linears (N x K)
DECODE = "decode-H200.json"  # the file: the latest full protocol (session 40, main 39d718b)

# (goal, rows it covers, the measured value of a row, the least value that meets it); kernel rows of bench kernels
KERNEL_GOALS = (
    ("M = 1, alpha = 0: >= 3.0x bf16 on every 7B shape", lambda r: r["M"] == 1 and _is7b(r),
     lambda r: r["bf16_us"] / r["alpha0_us"], 3.0),
    ("M = 1, alpha = 1 at 1 %: >= 2.7x bf16 on every 7B shape", lambda r: r["M"] == 1 and _is7b(r) and r["density"] == 0.01,
     lambda r: r["bf16_us"] / r["alpha1_us"], 2.7),
    ("M = 1, alpha = 1 at 5 %: >= 2.0x bf16", lambda r: r["M"] == 1 and _is7b(r) and r["density"] == 0.05,
     lambda r: r["bf16_us"] / r["alpha1_us"], 2.0),
    ("M = 16, alpha = 0: >= 2.5x bf16", lambda r: r["M"] == 16 and _is7b(r),
     lambda r: r["bf16_us"] / r["alpha0_us"], 2.5),
    ("null test: alpha = 0 within 2 % of a base-only run (M <= 16)", lambda r: r["M"] <= 16 and r.get("base_only_us"),
     lambda r: r["base_only_us"] / r["alpha0_us"], 1 / 1.02),
    ("M >= 512, alpha = 0: at most 1.5x the bf16 time (speed-up >= 0.667x)", lambda r: r["M"] >= 512,
     lambda r: r["bf16_us"] / r["alpha0_us"], 1 / 1.5),
    ("M >= 512, alpha = 1: at most 1.5x the bf16 time", lambda r: r["M"] >= 512 and r["density"] > 0,
     lambda r: r["bf16_us"] / r["alpha1_us"], 1 / 1.5),
)

# decode goals: batch-1 rows of the 7B-shaped model
DECODE_GOALS = (
    ("batch 1, alpha = 0: >= 2.8x bf16 tokens/s", lambda r: r["alpha0_tok_s"] / r["bf16_tok_s"], 2.8),
    ("batch 1, alpha = 1 (1 %): >= 2.5x bf16 tokens/s", lambda r: r["alpha1_tok_s"] / r["bf16_tok_s"], 2.5),
    ("weights >= 3x smaller than bf16's", lambda r: r["bf16_weight_bytes"] / r["alpha1_weight_bytes"], 3.0),
)


def _is7b(r) -> bool:
    return (r["N"], r["K"]) in SHAPES_7B


def check(rows: list[dict], goals) -> list[dict]:
    """One entry per goal: how many rows it covers, the least and largest measured value, whether all meet it."""
    out = []
    for name, covers, value, least in goals:
        vals = [value(r) for r in rows if covers(r)]
        out.append({"goal": name, "rows": len(vals), "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None, "met": bool(vals) and min(vals) >= least, "needs": least})
    return out


def check_decode(rows: list[dict]) -> list[dict]:
    b1 = [r for r in rows if r.get("model") == "llama2-7b-shape" and r.get("batch") == 1
          and r.get("alpha0_tok_s") and r.get("alpha1_tok_s") and r.get("bf16_tok_s")]
    return check(b1, [(n, lambda r: True, v, least) for n, v, least in DECODE_GOALS])


def table(entries: list[dict]) -> list[str]:
    f = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    lines = ["| goal | rows | measured | met |", "|---|---:|---:|---|"]
    for e in entries:
        measured = f(e["min"]) if e["min"] == e["max"] else f"{f(e['min'])} - {f(e['max'])}"
        met = "yes" if e["met"] else ("no rows" if not e["rows"] else f"**no** (needs {e['needs']:.2f}x)")
        lines.append(f"| {e['goal']} | {e['rows']} | {measured} | {met} |")
    return lines


def report(kernels: dict, decode: dict, kernels_name: str, decode_name: str) -> str:
    k, d = check(kernels["rows"], KERNEL_GOALS), check_decode(decode["rows"])
    return "\n".join([
        f"# Speed goals against measured results ({kernels['card']})", "",
        "The goals are stated for an H100; a goal is met only if every row it covers meets it (alpha = 0 is timed "
        "again in each density's row, so each counts). Ratios are speed-ups over bf16 timed in the same run "
        "(`python benchmarks/goals.py`).", "",
        f"## Kernels (`{kernels_name}`, {kernels['card']}, {kernels['date']})", "", *table(k), "",
        f"## Decode (`{decode_name}`, {decode['card']}, {decode['date']})", "", *table(d), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default=str(RESULTS / "kernels-H200.json"))
    ap.add_argument("--decode", default=str(RESULTS / DECODE))
    ap.add_argument("--out", default=None, help="default: results/goals-<card>.md")
    args = ap.parse_args()
    kernels, decode = json.loads(Path(args.kernels).read_text()), json.loads(Path(args.decode).read_text())
    text = report(kernels, decode, Path(args.kernels).name, Path(args.decode).name)
    card = kernels["card"].replace("NVIDIA ", "").replace(" ", "-")
    out = Path(args.out) if args.out else RESULTS / f"goals-{card}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
