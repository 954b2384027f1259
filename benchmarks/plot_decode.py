"""Plot the 7B-shape decode benchmark against the issue's goals (CPU only): tokens/s of bf16, LibOrtho alpha = 1
(1 % ortho) and alpha = 0 per batch size, each LibOrtho bar labelled with its speed-up over bf16 in the same
run, and the goals at batch 1 (2.8x alpha 0, 2.5x alpha 1) as marks at that multiple of the bf16 bar.

    python benchmarks/plot_decode.py   # reads the decode JSONs named in SOURCES, writes decode-H200.png
"""
from __future__ import annotations

import json
from pathlib import Path

from plot_common import RESULTS, card_arg, card_title, save

SOURCES = ("decode-{card}-llama2-7b-shape-compile-s45-full.json",)  # today's defaults (step op, GLU layer, PDL first
# for one-row calls), b1 + b8 (2026-12-01 14:3x UTC, one run; the 7B rows of decode-{card}.json)
VARIANTS = (("bf16", "bf16"), ("alpha1", "LibOrtho alpha = 1 (1 %)"), ("alpha0", "LibOrtho alpha = 0"))
GOALS = {("alpha0", 1): 2.8, ("alpha1", 1): 2.5}


def bars(results: list[dict], model: str = "llama2-7b-shape") -> dict[int, dict[str, float]]:
    """{batch: {variant: tok/s}} over the results' rows of one model (a later file overrides an earlier one)."""
    out: dict[int, dict[str, float]] = {}
    for res in results:
        for r in res["rows"]:
            if r["model"] == model:
                out.setdefault(r["batch"], {}).update({v: r[f"{v}_tok_s"] for v, _ in VARIANTS if r.get(f"{v}_tok_s")})
    return dict(sorted(out.items()))


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = bars(results)
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4.5))
    axes = axes if len(data) > 1 else [axes]
    for ax, (batch, tok) in zip(axes, data.items()):
        xs = [i for i, (v, _) in enumerate(VARIANTS) if v in tok]
        ax.bar(xs, [tok[VARIANTS[i][0]] for i in xs], color=["gray", "tab:orange", "tab:blue"][: len(xs)])
        for i in xs:
            v = VARIANTS[i][0]
            if v != "bf16" and "bf16" in tok:
                ax.annotate(f"{tok[v] / tok['bf16']:.2f}x", (i, tok[v]), ha="center", va="bottom")
            if (v, batch) in GOALS and "bf16" in tok:
                ax.plot([i], [GOALS[v, batch] * tok["bf16"]], marker="_", ms=40, mew=2.5, color="black")
        ax.set_xticks(xs, [VARIANTS[i][1] for i in xs], fontsize=8)
        ax.set_ylabel("tokens / s (whole batch)")
        ax.set_title(f"batch {batch}" + (" (black: the goal)" if batch == 1 else ""))
    save(fig, out, card_title(results[-1]["card"], results[-1]["date"],
                              "Llama-2-7B-shaped model, compiled decode step, same harness"))


def main() -> None:
    card = card_arg(__doc__)
    results = [json.loads((RESULTS / s.format(card=card)).read_text()) for s in SOURCES]
    out = RESULTS / f"decode-{card}.png"
    plot(results, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
