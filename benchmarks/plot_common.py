"""What the benchmark plots (plot_*.py) share: the --card argument, the results folder, the title line and
saving the figure. The plot scripts import it from beside them (run as ``python benchmarks/plot_x.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def card_arg(doc: str) -> str:
    """The card whose results to plot (--card, default H200), as it appears in the result file names."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--card", default="H200")
    return ap.parse_args().card


def card_title(card: str, date: str, what: str = "") -> str:
    """'NVIDIA <card>, <day>[: what]': one form in every plot, whether the JSON names the card with the prefix or not."""
    return f"NVIDIA {card.replace('NVIDIA ', '')}, {date[:10]}" + (f": {what}" if what else "")


def save(fig, out: Path, title: str | None = None, dpi: int = 110) -> None:
    """Title the figure (if given), lay it out, write it to ``out`` and free it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
