"""Plot the kernel table against the issue's goals (CPU only): speed-up over bf16 F.linear (timed in the same
run) against M for every shape, one panel per column (alpha 0, alpha 1 with 1 % and 5 % ortho), torch's int4
kernel beside alpha 0, and the goals as marks (M = 1: 3.0x / 2.7x / 2.0x, M = 16: 2.5x at alpha 0, M >= 512:
at most 1.5x the bf16 time, i.e. 0.67x).

    python benchmarks/plot_kernels.py   # reads benchmarks/results/kernels-H200.json, writes kernels-H200.png
"""
from __future__ import annotations

import json
from pathlib import Path

from plot_common import RESULTS, card_arg, card_title, save

# (title, time column, density, goals {M: speed-up})
PANELS = [("alpha = 0", "alpha0_us", 0.0, {1: 3.0, 16: 2.5, 512: 1 / 1.5}),
          ("alpha = 1, 1 % ortho", "alpha1_us", 0.01, {1: 2.7}),
          ("alpha = 1, 5 % ortho", "alpha1_us", 0.05, {1: 2.0})]


def speedup_series(result: dict, key: str, density: float) -> dict[str, tuple[list[int], list[float]]]:
    """{"NxK": (Ms ascending, bf16_us / key)} over the rows of one density that have the column."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        if r["density"] == density and r.get(key):
            out.setdefault(f"{r['N']}x{r['K']}", []).append((r["M"], r["bf16_us"] / r[key]))
    return {shape: ([m for m, _ in sorted(v)], [s for _, s in sorted(v)]) for shape, v in out.items()}


def plot(result: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, key, density, goals) in zip(axes, PANELS):
        for i, (shape, (ms, sp)) in enumerate(speedup_series(result, key, density).items()):
            ax.plot(ms, sp, marker="o", ms=3, color=colors[i % len(colors)], label=shape)
            if key == "alpha0_us":
                t_ms, t_sp = speedup_series(result, "torch_int4_us", 0.0).get(shape, ([], []))
                ax.plot(t_ms, t_sp, ls=":", color=colors[i % len(colors)], lw=1)
        for m, g in goals.items():
            ax.plot([m], [g], marker="_", ms=22, mew=2.5, color="black")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_title(title)
    axes[0].set_ylabel("speed-up over bf16 F.linear")
    axes[0].plot([], [], ls=":", color="gray", label="torch int4 (dotted)")
    axes[0].plot([], [], marker="_", ls="", ms=14, mew=2.5, color="black", label="goal (issue, H100)")
    axes[0].legend(fontsize=7)
    save(fig, out, card_title(result["card"], result["date"], "LibOrtho INT4 g128 against bf16, same run"))


def main() -> None:
    card = card_arg(__doc__)
    out = RESULTS / f"kernels-{card}.png"
    plot(json.loads((RESULTS / f"kernels-{card}.json").read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
