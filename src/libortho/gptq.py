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

Implementation (what keeps the sweep cheap on a GPU, where it is bound by kernel launches): the block
being swept is held transposed, so a column is a contiguous row; codes, residuals and ortho flags are
written in place into preallocated (K, N) buffers through ``out=``; the scale/zero rows of every group
are looked up as views; the clipping candidates of many groups and rows are tried in one batch; the
ortho picks are ``index_fill_`` of the top rows; the pre-pass takes its global top k through a top-k
threshold rather than a stable sort of every entry; nothing in the sweep reads a device value on the
host. About 15 compute ops per column with ortho extraction (11 without), against 28 (20) before, and
the results are bit-identical to that straightforward per-column loop (``tests/gptq_reference.py``;
``benchmarks/gptq_equivalence.py`` checks the SmolLM2 shapes). On a GPU with act-order, each block's
column loop runs on fixed buffers and is captured once per shape as a CUDA graph (``BlockSweep``), then
replayed for every block of every layer: the host launches one graph per block instead of ~15 kernels
per column (``benchmarks/gptq_sweep_gpu.py`` times both and checks they agree bit for bit).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import quant
from .sieve import CSR, csr_from_indices, ortho_count, select_topk

_SHRINKS = torch.linspace(1.0, 0.7, 16)  # fp32, as the candidates always were


def fit_groups(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype, clip_search: bool):
    """Scales and zeros (each (N, G)) of G equal groups of columns, w (N, G, g) row-major.

    All clipping candidates of many groups and rows are evaluated in one batch (of at most
    ``_batch_elements`` entries: cache-sized on the CPU, large on a GPU); per group the first shrink
    with the strictly smallest ``sum |w - deq q|^2.4`` wins, which is what a sequential
    ``err < best`` scan over the shrinks keeps.
    """
    n, groups, g = w.shape
    if not clip_search:
        best = quant.grid_from_range(w.amin(dim=2), w.amax(dim=2), bits, -1, symmetric, scale_dtype)
        return best.scales, best.zeros
    limit = _batch_elements(w.device)
    per_row = len(_SHRINKS) * groups * g
    if n * per_row > limit and n > 1:  # split the rows (independent) to bound the temporaries
        step = max(1, limit // per_row)
        parts = [fit_groups(w[r:r + step], bits, symmetric, scale_dtype, clip_search) for r in range(0, n, step)]
        return (torch.cat([p[0] for p in parts]), None if symmetric else torch.cat([p[1] for p in parts]))
    wmin, wmax = w.amin(dim=2), w.amax(dim=2)  # (N, G)
    p = _SHRINKS.to(w.device)[:, None, None]  # (S, 1, 1)
    cand = quant.grid_from_range(wmin * p, wmax * p, bits, -1, symmetric, scale_dtype)  # (S, N, G)
    s = cand.scales.float()[..., None]
    z = cand.zero_points()[..., None]
    t = torch.div(w, s)  # (S, N, G, g), then in place: deq q, w - deq q, |.|^2.4
    t.round_().add_(z).clamp_(0, 2 ** bits - 1).sub_(z).mul_(s)
    err = torch.sub(w, t, out=t).abs_().pow_(2.4).sum(dim=3)  # (S, N, G)
    # a NaN error never wins a strict comparison (and a NaN first candidate is never replaced)
    nan = torch.isnan(err)
    pick = torch.argmin(err.masked_fill(nan, float("inf")), dim=0, keepdim=True)
    pick = pick.masked_fill(nan[:1], 0)
    scales = cand.scales.gather(0, pick)[0]
    zeros = None if cand.zeros is None else cand.zeros.gather(0, pick)[0]
    return scales, zeros


def _batch_elements(device) -> int:
    return 1 << (26 if device.type == "cuda" else 20)


def fit_group(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype, clip_search: bool):
    """Scale and zero (each (N,)) of one group of columns w (N, g)."""
    s, z = fit_groups(w.contiguous()[:, None, :], bits, symmetric, scale_dtype, clip_search)
    return s[:, 0], None if z is None else z[:, 0]


def fit_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype,
             clip_search: bool) -> quant.QuantGrid:
    """Grid of a whole matrix (used for static groups): the full groups in one batch, then a short last one."""
    n, k = w.shape
    g = quant.effective_group_size(group_size, k)
    w = w.contiguous()
    full = k // g
    parts = []
    if full:
        parts.append(fit_groups(w[:, :full * g].reshape(n, full, g), bits, symmetric, scale_dtype, clip_search))
    if full * g < k:
        parts.append(fit_groups(w[:, full * g:].contiguous()[:, None, :], bits, symmetric, scale_dtype,
                                clip_search))
    scales = torch.cat([p[0] for p in parts], dim=1)
    zeros = None if symmetric else torch.cat([p[1] for p in parts], dim=1)
    return quant.QuantGrid(scales, zeros, bits, group_size)


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
                   clip_search: bool = True, sweep: str | None = None
                   ) -> tuple[torch.Tensor, quant.QuantGrid, CSR | None]:
    """GPTQ sweep of W (N, K) with H (K, K); returns (codes, grid, ortho CSR or None).

    ``sweep``: "eager" (the per-column loop), "static" (the same ops on fixed per-block buffers,
    replayed as one CUDA graph per block on a GPU; act-order only) or None/"auto" (static on CUDA
    with act-order). Both give bit-identical results; env LIBORTHO_GPTQ_SWEEP sets the default.
    """
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
    # per-group rows (G, N): the scale and zero of column j's group are the views ST[grp], ZT[grp]
    ST = static.scales.float().t().contiguous()
    ZT = static.zero_points().t().contiguous()

    n_ortho = ortho_count(density, W.numel()) if density > 0 else 0
    budget, fixed = _column_budget(W, perm, static, d, n_ortho, score, seed)
    # swept-order outputs, one contiguous row per column: codes (as floats), residual w - deq q
    # (the ortho values are read from it at the flagged entries) and the ortho flags
    QT = torch.empty(k, n, device=device)
    RT = torch.empty(k, n, device=device)
    MT = fixed.t().contiguous() if fixed is not None else torch.zeros(k, n, dtype=torch.bool, device=device)
    mode = "none" if not n_ortho else "fixed" if fixed is not None else score
    if act_order and _use_static(device, sweep):
        _sweep_static(W, U, d, ST, ZT, perm // g, budget, QT, RT, MT, maxq, mode, block_size)
    else:
        # host copies of the permutation and budgets: no device sync inside the sweep
        _sweep_eager(W, U, d, ST, ZT, perm.tolist(), budget.tolist(), QT, RT, MT, g, maxq, mode, block_size,
                     act_order, bits, symmetric, scale_dtype, clip_search)

    inv = torch.argsort(perm)
    codes = QT[inv].t().contiguous().to(torch.uint8)
    grid = quant.QuantGrid(ST.t().contiguous().to(scale_dtype),
                           None if symmetric else ZT.t().contiguous().to(scale_dtype), bits, group_size)
    csr = None
    if n_ortho:
        ortho_mask = MT[inv].t().contiguous()
        idx = torch.nonzero(ortho_mask.reshape(-1)).reshape(-1)
        assert idx.numel() == n_ortho, (idx.numel(), n_ortho)
        csr = csr_from_indices(RT[inv].t().contiguous(), idx, value_dtype)
    return codes, grid, csr


def _sweep_eager(W, U, d, ST, ZT, perm_cols, budget, QT, RT, MT, g, maxq, mode, block_size, act_order,
                 bits, symmetric, scale_dtype, clip_search) -> None:
    """The per-column loop (any device, with or without act-order); fills QT, RT, MT in place."""
    k, n = QT.shape
    device = W.device
    q_rows, r_rows, m_rows, d_vals = QT.unbind(0), RT.unbind(0), MT.unbind(0), d.unbind(0)
    s_rows, z_rows = ST.unbind(0), ZT.unbind(0)
    deq = torch.empty(n, device=device)
    sal = torch.empty(n, device=device)
    E1T = torch.empty(block_size, n, device=device)  # errors of the block, one row per column
    upd = torch.empty(block_size, n, device=device)
    e_rows = E1T.unbind(0)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        B = i2 - i1
        W1T = W[:, i1:i2].t().contiguous()  # (B, N): column j of the block is the row W1T[j]
        w_rows = W1T.unbind(0)
        U1 = U[i1:i2, i1:i2]
        for i in range(B):
            j = i1 + i
            col = perm_cols[j]
            grp = col // g
            if not act_order and col % g == 0:  # fit the group on the updated weights
                cols = torch.cat([W1T[i:].t(), W[:, i2:]], dim=1)[:, : min(g, k - col)]
                s, z = fit_group(cols, bits, symmetric, scale_dtype, clip_search)
                ST[grp] = s.float()
                if z is not None:
                    ZT[grp] = z.float()
            r, e = r_rows[j], e_rows[i]
            _quantize_column(w_rows[i], s_rows[grp], z_rows[grp], d_vals[j], maxq, q_rows[j], r, e, deq)
            if budget[j]:
                if mode == "fixed":
                    e.masked_fill_(m_rows[j], 0.0)
                else:
                    top = torch.argsort(_saliency(mode, r, e, sal), descending=True, stable=True)[:budget[j]]
                    e.index_fill_(0, top, 0.0)
                    m_rows[j].index_fill_(0, top, True)
            _propagate(W1T, U1, e, i, upd)
        if i2 < k:
            W[:, i2:] -= E1T[:B].t().contiguous() @ U[i1:i2, i2:]


def _quantize_column(w, s, z, d, maxq: int, q, r, e, deq) -> None:
    """Codes q of column w on its group's grid (s, z), residual r = w - deq q, error e = r / d (in place)."""
    torch.div(w, s, out=q)
    q.round_().add_(z).clamp_(0, maxq)
    torch.sub(q, z, out=deq).mul_(s)
    torch.sub(w, deq, out=r)
    torch.div(r, d, out=e)


def _saliency(mode: str, r, e, sal):
    """OBS saliency e^2 (hessian) or |r| (magnitude) of a column's entries, into sal."""
    return torch.abs(r, out=sal) if mode == "magnitude" else torch.square(e, out=sal)


def _propagate(WT, U1, e, i: int, upd) -> None:
    """Feed column i's error forward onto the block's later columns (rows of WT)."""
    B = WT.shape[0]
    if i + 1 < B:
        u = upd[: B - i - 1]
        torch.mul(U1[i, i + 1:, None], e, out=u)
        WT[i + 1:].sub_(u)


def _use_static(device, sweep: str | None) -> bool:
    sweep = sweep or os.environ.get("LIBORTHO_GPTQ_SWEEP", "auto")
    if sweep not in ("auto", "eager", "static"):
        raise ValueError(f"sweep must be 'auto', 'eager' or 'static', got {sweep!r}")
    return sweep == "static" or (sweep == "auto" and device.type == "cuda")


class BlockSweep:
    """The column loop of one block of B columns on fixed buffers, so that a GPU replays it as one
    CUDA graph (about 15 launches per column otherwise, which bound the sweep by the host).

    The ops are those of the eager loop; the ortho pick is made data-independent (a stable descending
    sort, then the first ``budget`` ranks flagged through a scatter), so one graph serves every block
    of a shape whatever its per-column budgets. Inputs: W (B, N) the block's columns as rows (updated
    in place), S, Z (B, N) each column's group scale and zero, d (B,), U (B, B), budget (B, 1) and, for
    the fixed (random) mask, M (B, N). Outputs: Q, R, M, E (the propagated errors).
    """

    def __init__(self, n: int, B: int, maxq: int, mode: str, device):
        f = dict(device=device)
        self.B, self.maxq, self.mode = B, maxq, mode
        self.W, self.Q, self.R, self.E = (torch.zeros(B, n, **f) for _ in range(4))
        self.S, self.Z = torch.ones(B, n, **f), torch.zeros(B, n, **f)
        self.d, self.U = torch.ones(B, **f), torch.zeros(B, B, **f)
        self.budget = torch.zeros(B, 1, dtype=torch.long, **f)
        self.M = torch.zeros(B, n, dtype=torch.bool, **f)
        self._deq, self._sal, self._upd = torch.empty(n, **f), torch.empty(n, **f), torch.empty(B, n, **f)
        self._keep, self._ranks = torch.empty(n, dtype=torch.bool, **f), torch.arange(n, **f)
        self.graph = self._capture() if torch.device(device).type == "cuda" else None

    def _capture(self):
        side = torch.cuda.Stream(self.W.device)
        side.wait_stream(torch.cuda.current_stream(self.W.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            self._body()
        torch.cuda.current_stream(self.W.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body()
        except RuntimeError as err:  # same results without the graph, only slower
            warnings.warn(f"GPTQ sweep: CUDA graph capture failed ({err}); running the block loop eagerly")
            return None
        return graph

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()

    def _body(self) -> None:
        B, deq, sal, keep = self.B, self._deq, self._sal, self._keep
        for i in range(B):
            r, e, m = self.R[i], self.E[i], self.M[i]
            _quantize_column(self.W[i], self.S[i], self.Z[i], self.d[i], self.maxq, self.Q[i], r, e, deq)
            if self.mode in ("hessian", "magnitude"):
                order = torch.sort(_saliency(self.mode, r, e, sal), descending=True, stable=True).indices
                torch.lt(self._ranks, self.budget[i], out=keep)
                m.scatter_(0, order, keep)
            if self.mode != "none":
                e.masked_fill_(m, 0.0)
            _propagate(self.W, self.U, e, i, self._upd)


_SWEEPS: dict = {}


def block_sweep(n: int, B: int, maxq: int, mode: str, device) -> BlockSweep:
    """One BlockSweep (and its graph) per shape, reused across layers and calls."""
    key = (str(device), n, B, maxq, mode)
    if key not in _SWEEPS:
        _SWEEPS[key] = BlockSweep(n, B, maxq, mode, device)
    return _SWEEPS[key]


def _sweep_static(W, U, d, ST, ZT, grp, budget, QT, RT, MT, maxq, mode, block_size) -> None:
    """The act-order sweep through BlockSweep: per block, copy in, replay, copy out, lazy update."""
    k, n = QT.shape
    S_sw, Z_sw = ST[grp], ZT[grp]  # each swept column's group row, (K, N)
    budget = budget.to(W.device)[:, None]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        sw = block_sweep(n, i2 - i1, maxq, mode, W.device)
        sw.W.copy_(W[:, i1:i2].t())
        sw.S.copy_(S_sw[i1:i2])
        sw.Z.copy_(Z_sw[i1:i2])
        sw.d.copy_(d[i1:i2])
        sw.U.copy_(U[i1:i2, i1:i2])
        sw.budget.copy_(budget[i1:i2])
        if mode == "fixed":  # the given mask is read; the sieves write their own picks
            sw.M.copy_(MT[i1:i2])
        sw.run()
        QT[i1:i2], RT[i1:i2] = sw.Q, sw.R
        if mode in ("hessian", "magnitude"):
            MT[i1:i2] = sw.M
        if i2 < k:
            W[:, i2:] -= sw.E.t().contiguous() @ U[i1:i2, i2:]


def _column_budget(W, perm, static: quant.QuantGrid, d, n_ortho: int, score: str, seed: int):
    """Per (swept) column counts summing to n_ortho, and the fixed mask for the random control."""
    n, k = W.shape
    if n_ortho == 0:
        return torch.zeros(k, dtype=torch.long), None
    if score == "random":
        gen = torch.Generator().manual_seed(seed)
        idx = top_indices(torch.rand(n, k, generator=gen), n_ortho)
        mask = torch.zeros(n * k, dtype=torch.bool)
        mask[idx] = True
        mask = mask.reshape(n, k)[:, perm.cpu()].to(W.device)
        return mask.sum(dim=0).cpu(), mask
    grid = quant.QuantGrid(static.scales, static.zeros, static.bits, static.group_size)
    orig = W[:, torch.argsort(perm)]
    r = (orig - quant.dequantize(quant.quantize_with_grid(orig, grid), grid))[:, perm]
    sal = r.abs() if score == "magnitude" else (r / d[None, :]).square()
    idx = top_indices(sal, n_ortho)
    return torch.bincount(idx % k, minlength=k).cpu(), None


def top_indices(score: torch.Tensor, m: int) -> torch.Tensor:
    """``sieve.select_topk(score, m)`` (the m highest, ties to the lower flat index, NaN lowest; ascending
    flat indices) through a top-k threshold instead of a stable sort of every entry."""
    flat = torch.nan_to_num(score.reshape(-1).float(), nan=-float("inf"))
    if m <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    if m >= flat.numel():
        return select_topk(score, m)
    v = torch.topk(flat, m, sorted=False).values.min()  # the m-th highest value
    above = flat > v
    tied = torch.nonzero(flat == v).reshape(-1)  # ascending
    take = m - int(above.sum())
    above[tied[:take]] = True
    return torch.nonzero(above).reshape(-1)
