"""Plot where the M = 1 time goes: per Llama shape, the per-call floor, the best read-only streaming kernel
over the same bytes (benchmarks/probes/stream_probe.py), torch's int4 kernel, LibOrtho v1 (plain and with
PDL) and bf16 F.linear, from the committed probe JSONs. CPU only.

    python benchmarks/plot_probe.py   # reads benchmarks/results/{probe,stream}-H200.json, writes probe-H200.png
"""
from __future__ import annotations

import json
from pathlib import Path

from plot_common import RESULTS, card_arg, save

BARS = [("floor", "empty graph node"), ("stream", "read-only stream (ceiling)"), ("torch_int4", "torch int4"),
        ("libortho_v1_pdl", "LibOrtho v1 + PDL"), ("libortho_v1", "LibOrtho v1"), ("bf16", "bf16 F.linear")]


def series(probe: dict, stream: dict) -> tuple[list[str], dict]:
    """Per shape, microseconds per call of each bar; the stream bar is the fastest configuration over the same
    byte count (4096x11008 has the bytes of 11008x4096)."""
    best = {}
    for r in stream["rows"]:
        best[r["bytes"]] = min(best.get(r["bytes"], float("inf")), r["us"])
    shapes, us = [], {key: [] for key, _ in BARS}
    for r in probe["rows"]:
        shapes.append(f"{r['N']}x{r['K']}")
        nbytes = r["N"] * r["K"] // 2
        for key, _ in BARS:
            us[key].append(best.get(nbytes, float("nan")) if key == "stream" else r["us"].get(key, float("nan")))
    return shapes, us


def plot(shapes: list[str], us: dict, card: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.8))
    h = 0.8 / len(BARS)
    for i, (key, label) in enumerate(BARS):
        ys = [j + (i - len(BARS) / 2 + 0.5) * h for j in range(len(shapes))]
        ax.barh(ys, us[key], height=h, label=label)
        for y, v in zip(ys, us[key]):
            ax.text(v + 0.2, y, f"{v:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(shapes)), shapes)
    ax.invert_yaxis()
    ax.set_xlabel("microseconds per call (M = 1, INT4 g128, CUDA graph, weights beyond L2)")
    ax.set_title(f"Where the decode time goes ({card})")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, out, dpi=130)


def main() -> None:
    card = card_arg(__doc__)
    probe = json.loads((RESULTS / f"probe-{card}.json").read_text())
    stream = json.loads((RESULTS / f"stream-{card}.json").read_text())
    shapes, us = series(probe, stream)
    out = RESULTS / f"probe-{card}.png"
    plot(shapes, us, probe["card"], out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
