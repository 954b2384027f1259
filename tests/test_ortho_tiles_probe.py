"""benchmarks/probes/ortho_tiles.py: entries per 16-row tile from a CSR row-pointer array."""
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "ortho_tiles", Path(__file__).resolve().parents[1] / "benchmarks" / "probes" / "ortho_tiles.py")
ortho_tiles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ortho_tiles)


def test_tile_counts_full_and_short_last_tile():
    counts = torch.arange(37) % 5                      # entries per row, 37 rows: tiles of 16, 16, 5
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    got = ortho_tiles.tile_counts(row_ptr, 37)
    assert got.tolist() == [int(counts[0:16].sum()), int(counts[16:32].sum()), int(counts[32:37].sum())]


def test_tile_counts_sum_to_nnz_on_a_bench_layer():
    torch.manual_seed(0)
    w = (torch.randn(40, 256) * 0.02).to(torch.bfloat16)
    layer = ortho_tiles._ortho_layer(w, 4, 128, 0.05)
    got = ortho_tiles.tile_counts(layer.row_ptr, 40)
    assert got.numel() == 3 and int(got.sum()) == layer.ortho_nnz > 0
