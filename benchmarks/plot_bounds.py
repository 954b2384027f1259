"""Plot what bounds decode from the committed probe JSONs (CPU only): left, v1's time at M = 1 against the
INT4 bytes of the layer, cold (copies beyond 4x L2) and warm (one copy, its bytes in L2), bf16 F.linear
beside it (benchmarks/probes/floor.py); right, a 7B-shape decode step split by kind of kernel at alpha 0
and 1 (benchmarks/probes/decode_profile.py).

    python benchmarks/plot_bounds.py   # reads benchmarks/results/{floor,decode-profile}-H200.json, writes bounds-H200.png
"""
from __future__ import annotations

import json
from pathlib import Path

from plot_common import RESULTS, card_arg, card_title, save

PARTS = [("libortho op", "LibOrtho's linears"), ("attention", "attention"),
         ("triton (compiled elementwise / norms / rotary)", "norms, adds, SiLU (Triton)"),
         ("cuBLAS (lm_head)", "lm_head (bf16)"), ("gaps", "between launches")]


def floor_series(floor: dict) -> dict:
    """{label: (MB, us) sorted by MB} for the cold / warm LibOrtho and cold bf16 times, alpha 0."""
    rows = sorted(floor["rows"], key=lambda r: r["int4_mb"])
    mb = [r["int4_mb"] for r in rows]
    return {"LibOrtho v1, cold": (mb, [r["alpha0_cold_us"] for r in rows]),
            "LibOrtho v1, warm (in L2)": (mb, [r["alpha0_warm_us"] for r in rows]),
            "bf16 F.linear, cold": (mb, [r["bf16_cold_us"] for r in rows])}


def step_parts(profile: dict) -> list[tuple[str, dict]]:
    """[(alpha label, {part: ms})] of the default attention backend's rows."""
    out = []
    for r in profile["rows"]:
        if "error" in r or r.get("sdpa", "default") != "default":
            continue
        parts = {key: r["categories_us"].get(key, 0.0) / 1e3 for key, _ in PARTS[:-1]}
        parts["gaps"] = r["launch_gap_ms"]
        out.append((f"alpha = {r['alpha']:g}", parts))
    return out


def plot(floor: dict, profile: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (mb, us) in floor_series(floor).items():
        ax1.plot(mb, us, marker="o", label=label)
    ax1.axhline(floor["null_us"], color="gray", ls=":", label="empty graph node")
    ax1.set_xlabel("INT4 weight bytes of the layer (MB; bf16 reads 4x more)")
    ax1.set_ylabel("us per call, M = 1, alpha = 0")
    ax1.set_title("v1 streams as fast from L2 as from HBM")
    ax1.legend(fontsize=8)
    bars = step_parts(profile)
    bottom = [0.0] * len(bars)
    for key, label in PARTS:
        vals = [p[key] for _, p in bars]
        ax2.bar([b for b, _ in bars], vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("ms per decode step (batch 1)")
    ax2.set_title("7B-shape decode step, compiled")
    ax2.legend(fontsize=8)
    save(fig, out, card_title(floor["card"], floor["date"]))


def main() -> None:
    card = card_arg(__doc__)
    floor = json.loads((RESULTS / f"floor-{card}.json").read_text())
    profile = json.loads((RESULTS / f"decode-profile-{card}.json").read_text())
    out = RESULTS / f"bounds-{card}.png"
    plot(floor, profile, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
