"""How the kernel bench's ortho entries spread over the 16-row tiles that v1's blocks own (CPU, seconds).

The bench's layers: bf16 N(0, 0.02) weights, RTN INT4 g128, magnitude sieve of the residual. v1 gives
each 16-row tile to one block, so the fullest tile bounds the block time of the ortho stream.

    PYTHONPATH=src python benchmarks/probes/ortho_tiles.py
"""
from __future__ import annotations

import torch

from libortho.eval.bench_kernels import _ortho_layer


def tile_counts(row_ptr: torch.Tensor, n: int) -> torch.Tensor:
    """Entries per 16-row tile (the last tile may be shorter)."""
    rp = row_ptr.long()
    starts = rp[0:n:16]
    ends = rp[torch.clamp(torch.arange(16, n + 16, 16), max=n)]
    return ends - starts


def main() -> None:
    torch.manual_seed(0)
    for n, k in [(4096, 4096), (11008, 4096)]:
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        for d in (0.005, 0.01, 0.05):
            c = tile_counts(_ortho_layer(w, 4, 128, d).row_ptr, n).float()
            print(f"{n}x{k} density {d}: entries per tile mean {c.mean():.0f}, max {c.max():.0f}, "
                  f"min {c.min():.0f}, max/mean {c.max() / c.mean():.2f}")


if __name__ == "__main__":
    main()
