"""Check that the GPTQ sweep (src/libortho/gptq.py) reproduces the reference per-column loop bit for bit.

The reference is a frozen copy of the implementation before the vectorized sweep
(tests/gptq_reference.py). Every case decomposes a random layer with a random SPD Hessian (a few
massive channels, as in SmolLM2) on the CPU in float32 with both, and asserts that codes, scales,
zeros and the CSR arrays (row pointers, columns, values) are identical, bit for bit.

    python benchmarks/gptq_equivalence.py            # the covering set (all small cases, a spread of big ones)
    python benchmarks/gptq_equivalence.py --full     # the whole grid of shapes x bits x groups x ... (slow)
    python benchmarks/gptq_equivalence.py --threads 2
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import gptq_reference as old  # noqa: E402

from libortho import gptq as new  # noqa: E402

SHAPES = [(64, 200), (576, 576), (1536, 576), (576, 1536)]


def hessian(k: int, seed: int, n: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k)
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=g)[:4]] = 20.0
    x = (torch.randn(n, k, generator=g) @ (torch.eye(k) + mix)) * scale
    return 2 * x.t() @ x / n


def bits_of(t: torch.Tensor | None):
    if t is None:
        return None
    t = t.contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32) if t.is_floating_point() else t


def same(a, b) -> bool:
    a, b = bits_of(a), bits_of(b)
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def compare(w, h, **kw) -> list[str]:
    c0, g0, s0 = old.gptq_decompose(w, h, **kw)
    c1, g1, s1 = new.gptq_decompose(w, h, **kw)
    bad = [name for name, a, b in [("codes", c0, c1), ("scales", g0.scales, g1.scales),
                                   ("zeros", g0.zeros, g1.zeros)] if not same(a, b)]
    if (s0 is None) != (s1 is None):
        bad.append("csr presence")
    elif s0 is not None:
        bad += [name for name in ("row_ptr", "col_idx", "values") if not same(getattr(s0, name), getattr(s1, name))]
        if s0.shape != s1.shape:
            bad.append("csr shape")
    return bad


def cases(full: bool):
    grid = list(itertools.product(SHAPES, (3, 4), (128, -1), (0.0, 0.01, 0.05), (True, False), (True, False)))
    extra = [  # other scores, knobs and dtypes
        ((64, 200), 4, 64, 0.05, True, True, dict(score="magnitude")),
        ((64, 200), 3, 32, 0.05, False, False, dict(score="magnitude")),
        ((64, 200), 4, 64, 0.05, True, True, dict(score="random", seed=3)),
        ((576, 576), 4, 128, 0.01, False, True, dict(score="random")),
        ((64, 200), 4, 64, 0.05, True, False, dict(clip_search=False)),
        ((576, 1536), 4, 128, 0.01, True, True, dict(clip_search=False)),
        ((64, 200), 2, 256, 0.05, False, True, dict()),
        ((64, 200), 8, 64, 0.05, True, False, dict()),
        ((96, 200), 3, 64, 0.01, False, True, dict(block_size=32)),
        ((96, 200), 4, 32, 0.05, True, True, dict(block_size=48)),
        ((576, 576), 4, 128, 0.01, True, True, dict(scale_dtype=torch.bfloat16, value_dtype=torch.bfloat16)),
        ((64, 200), 4, 64, 0.05, False, False, dict(scale_dtype=torch.float32)),
        ((128, 100), 3, 32, 0.5, True, True, dict()),
    ]
    out = []
    for i, (shape, bits, gs, dens, ao, sym) in enumerate(grid):
        # covering set: every small case; a third of the big ones (3 is coprime with the 2x2 inner knobs)
        if full or shape == (64, 200) or i % 3 == 0:
            out.append((shape, bits, gs, dens, ao, sym, {}))
    return out + [(s, b, g, d, a, y, kw) for s, b, g, d, a, y, kw in extra]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    failures, t_old, t_new = [], 0.0, 0.0
    todo = cases(args.full)
    t0 = time.perf_counter()
    for c, (shape, bits, gs, dens, ao, sym, kw) in enumerate(todo):
        n, k = shape
        seed = 10 * c + bits
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
        w[0, :3] = 0.0  # exact zeros: ties in the saliency ranking
        h = hessian(k, seed)
        args_ = dict(bits=bits, group_size=gs, symmetric=sym, density=dens, act_order=ao, **kw)
        bad = compare(w, h, **args_)
        tag = f"{n}x{k} " + " ".join(f"{a}={v}" for a, v in args_.items())
        print(("FAIL " + ",".join(bad) + " " if bad else "ok   ") + tag, flush=True)
        if bad:
            failures.append(tag)
    print(f"{len(todo) - len(failures)}/{len(todo)} cases bit-identical ({time.perf_counter() - t0:.0f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
