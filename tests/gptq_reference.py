# Frozen copy of src/libortho/gptq.py before the vectorized sweep (commit 291aa35): the equivalence reference.
"""Hessian-aware decomposition: a GPTQ column sweep that pulls the ortho entries out inside the sweep.

For a layer with weight W (N, K) and calibration Hessian H = 2 X^T X / n (K, K):

1. dampen H by ``damp * mean(diag H)``; with act-order, sweep columns by decreasing ``H_jj``;
2. take the upper Cholesky factor U of H^-1 (``d_j = U_jj``);
3. sweep in blocks of ``block_size`` columns: quantize column j on its group's grid, and move the
   column's most salient residuals into the ortho stream S *before* the error is propagated, so their
   error is zero and nothing is pushed onto later columns; the rest of the error ``(w - deq q) / d_j``
   is fed forward through U (lazy batch updates between blocks, as GPTQ does).

Exact ortho count: a pre-pass scores every entry by the OBS saliency of its round-to-nearest residual,
``((W_ij - deq(q_ij)) / d_j)^2`` (``|W_ij - deq(q_ij)|`` for the magnitude score), keeps the global top
``k = round(density * numel)``, and gives each column the number of entries it won there. In the sweep,
column j then moves exactly that many entries, its rows of highest saliency on the *updated* weights
(ties to the lower row). The per-column counts sum to k, so the layer holds exactly k entries. The
random score (a control) draws a seeded mask of k entries up front and extracts exactly those.

Group grids: without act-order a group's scales are fitted when the sweep reaches its first column,
on the updated weights (as GPTQ does); with act-order they are fitted on the original weights before
the sweep (GPTQ's static groups), since the group's columns are no longer swept together. Optional
clipping search picks, per group, the shrink of the range that minimizes ``sum |w - deq q|^2.4``.
"""
from __future__ import annotations


import torch

from libortho import quant
from libortho.sieve import CSR, csr_from_indices, ortho_count, select_topk

_SHRINKS = torch.linspace(1.0, 0.7, 16).tolist()


def fit_group(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype, clip_search: bool):
    """Scale and zero (each (N,)) of one group of columns w (N, g)."""
    wmin, wmax = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    best = quant.grid_from_range(wmin, wmax, bits, -1, symmetric, scale_dtype)
    if clip_search:
        best_err = _group_error(w, best)
        for p in _SHRINKS[1:]:
            cand = quant.grid_from_range(wmin * p, wmax * p, bits, -1, symmetric, scale_dtype)
            err = _group_error(w, cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.scales = torch.where(better[:, None], cand.scales, best.scales)
            if best.zeros is not None:
                best.zeros = torch.where(better[:, None], cand.zeros, best.zeros)
    return best.scales[:, 0], None if best.zeros is None else best.zeros[:, 0]


def _group_error(w: torch.Tensor, grid: quant.QuantGrid) -> torch.Tensor:
    grid = quant.QuantGrid(grid.scales, grid.zeros, grid.bits, w.shape[1])
    deq = quant.dequantize(quant.quantize_with_grid(w, grid), grid)
    return (w - deq).abs().pow(2.4).sum(dim=1)


def fit_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype,
             clip_search: bool) -> quant.QuantGrid:
    """Grid of a whole matrix, group by group (used for static groups and RTN with clipping)."""
    n, k = w.shape
    g = quant.effective_group_size(group_size, k)
    parts = [fit_group(w[:, c:c + g], bits, symmetric, scale_dtype, clip_search) for c in range(0, k, g)]
    scales = torch.stack([p[0] for p in parts], dim=1)
    zeros = None if symmetric else torch.stack([p[1] for p in parts], dim=1)
    return quant.QuantGrid(scales, zeros, bits, group_size)


def _quant_col(w, scale, zero, maxq):
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, (q - zero) * scale


def prepare_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.float().clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0], device=H.device)
    return H


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding dampening until H is numerically positive definite."""
    extra = 0.0
    eye = torch.eye(H.shape[0], device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = max(extra * 10, 1e-6 * float(torch.diagonal(H).mean()))
    raise RuntimeError("the layer Hessian is not positive definite even after extra dampening")


def gptq_decompose(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                   symmetric: bool = True, density: float = 0.0, score: str = "hessian",
                   damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                   scale_dtype=torch.float16, value_dtype=torch.float16, seed: int = 0,
                   clip_search: bool = True) -> tuple[torch.Tensor, quant.QuantGrid, CSR | None]:
    """GPTQ sweep of W (N, K) with H (K, K); returns (codes, grid, ortho CSR or None)."""
    device = H.device
    W = W.to(device=device, dtype=torch.float32).clone()
    n, k = W.shape
    g = quant.effective_group_size(group_size, k)
    maxq = 2 ** bits - 1
    H = prepare_hessian(H, damp)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else \
        torch.arange(k, device=device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H)
    d = torch.diagonal(U)

    static = fit_grid(W[:, torch.argsort(perm)], bits, group_size, symmetric, scale_dtype, clip_search)
    scales = static.scales.float().clone()
    zeros = static.zero_points().clone()

    n_ortho = ortho_count(density, W.numel()) if density > 0 else 0
    budget, fixed = _column_budget(W, perm, static, d, n_ortho, score, seed)
    ortho_mask = torch.zeros(n, k, dtype=torch.bool, device=device)
    ortho_val = torch.zeros(n, k, device=device)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=device)
    budget = budget.tolist()
    perm_cols = perm.tolist()  # host copies: no device sync inside the sweep

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col = perm_cols[j]
            grp = col // g
            if not act_order and col % g == 0:  # fit the group on the updated weights
                cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : min(g, k - col)]
                s, z = fit_group(cols, bits, symmetric, scale_dtype, clip_search)
                scales[:, grp] = s.float()
                zeros[:, grp] = z.float() if z is not None else 2 ** (bits - 1)
            w = W1[:, i]
            q, deq = _quant_col(w, scales[:, grp], zeros[:, grp], maxq)
            r = w - deq
            if budget[j]:
                rows = _pick_rows(r, d[j], budget[j], score, None if fixed is None else fixed[:, j])
                ortho_mask[rows, j] = True
                ortho_val[rows, j] = r[rows]
                r[rows] = 0.0
            codes[:, j] = q.to(torch.uint8)
            err = r / d[j]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, ortho_mask, ortho_val = codes[:, inv], ortho_mask[:, inv], ortho_val[:, inv]
    grid = quant.QuantGrid(scales.to(scale_dtype),
                           None if symmetric else zeros.to(scale_dtype), bits, group_size)
    csr = None
    if n_ortho:
        idx = torch.nonzero(ortho_mask.reshape(-1)).reshape(-1)
        assert idx.numel() == n_ortho, (idx.numel(), n_ortho)
        csr = csr_from_indices(ortho_val, idx, value_dtype)
    return codes, grid, csr


def _column_budget(W, perm, static: quant.QuantGrid, d, n_ortho: int, score: str, seed: int):
    """Per (swept) column counts summing to n_ortho, and the fixed mask for the random control."""
    n, k = W.shape
    if n_ortho == 0:
        return torch.zeros(k, dtype=torch.long), None
    if score == "random":
        gen = torch.Generator().manual_seed(seed)
        idx = select_topk(torch.rand(n, k, generator=gen), n_ortho)
        mask = torch.zeros(n * k, dtype=torch.bool)
        mask[idx] = True
        mask = mask.reshape(n, k)[:, perm.cpu()].to(W.device)
        return mask.sum(dim=0).cpu(), mask
    grid = quant.QuantGrid(static.scales, static.zeros, static.bits, static.group_size)
    orig = W[:, torch.argsort(perm)]
    r = (orig - quant.dequantize(quant.quantize_with_grid(orig, grid), grid))[:, perm]
    sal = r.abs() if score == "magnitude" else (r / d[None, :]).square()
    idx = select_topk(sal, n_ortho)
    return torch.bincount(idx % k, minlength=k).cpu(), None


def _pick_rows(r, dj, count: int, score: str, fixed_col):
    if fixed_col is not None:
        return torch.nonzero(fixed_col).reshape(-1)
    sal = r.abs() if score == "magnitude" else (r / dj).square()
    return torch.sort(torch.argsort(sal, descending=True, stable=True)[:count]).values


