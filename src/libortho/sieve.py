"""The sieve: which entries of the residual go to the sparse ortho stream, and the CSR they form.

The kept count is exact: ``ortho_count(density, numel) = floor(density * numel + 0.5)`` entries per
layer, chosen by score with ties broken by the lower flat index (row-major), never more, never fewer.

Scores over the residual ``R = W - deq(Q)`` (higher = more worth keeping):

* ``magnitude``: ``|R_ij|``.
* ``hessian``: ``R_ij**2 * H_jj`` with ``H = 2 X^T X / n`` of the layer's calibration inputs: the
  increase of the layer's output error ``||X r||^2 / n`` (up to the factor 2) that entry causes alone.
  (The in-sweep GPTQ extraction in :mod:`libortho.gptq` uses the OBS form ``(R_ij / [H^-1]_jj)^2``.)
* ``random``: seeded uniform scores; a control, not a method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("hessian", "magnitude", "random")
VALUE_DTYPES = (torch.float16, torch.bfloat16)


def check_density(density, allow_zero: bool = False) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1), got {density!r}")
    density = float(density)
    if allow_zero and density == 0.0:
        return density
    if not 0.0 < density < 1.0:
        raise ValueError(
            f"density={density!r} is outside (0, 1): it is the fraction of weights kept in the ortho "
            "stream (0.01 = 1 %); for a base-only model use OrthoConfig.base_only(...)")
    return density


def ortho_count(density: float, numel: int) -> int:
    """Exact number of ortho entries for a layer: round half up of density * numel."""
    return int(density * numel + 0.5)


def scores(residual: torch.Tensor, score: str, hessian: torch.Tensor | None = None,
           seed: int = 0) -> torch.Tensor:
    """Score every entry of the residual (N, K); fp32."""
    r = residual.float()
    if score == "magnitude":
        return r.abs()
    if score == "hessian":
        if hessian is None:
            raise ValueError("score='hessian' needs the layer's Hessian H = 2 X^T X / n "
                             "(pass calibration data to decompose, or hessian= here)")
        if hessian.shape != (r.shape[1], r.shape[1]):
            raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected "
                             f"({r.shape[1]}, {r.shape[1]}) for a residual of shape {tuple(r.shape)}")
        return r.square() * torch.diagonal(hessian).float().clamp_min(0).to(r.device)
    if score == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(r.shape, generator=gen).to(r.device)
    raise ValueError(f"score={score!r} is not supported; expected one of {SCORES}")


def select_topk(score: torch.Tensor, k: int, prefer: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices (ascending) of the k highest scores.

    Ties go to entries in ``prefer`` (a boolean mask, optional), then to the lower flat index.
    """
    flat = score.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot keep {k} entries out of {flat.numel()}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    # NaN would make the order undefined: rank it lowest.
    flat = torch.nan_to_num(flat.float(), nan=-float("inf"))
    order = torch.arange(flat.numel(), device=flat.device)
    if prefer is not None:
        order = torch.sort(prefer.reshape(-1).to(torch.uint8), descending=True, stable=True).indices
    order = order[torch.sort(flat[order], descending=True, stable=True).indices]
    return torch.sort(order[:k]).values


def entry_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of each of the nnz CSR entries. ``output_size`` avoids a device-to-host read of the counts,
    so this is CUDA-graph capturable."""
    return torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device),
                                   (row_ptr[1:] - row_ptr[:-1]).long(), output_size=nnz)


@dataclass
class CSR:
    """Sparse (N, K) matrix: int32 row pointers, int16/int32 columns, fp16/bf16 values."""
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_dense(self, dtype=torch.float32) -> torch.Tensor:
        n, k = self.shape
        dense = torch.zeros(n, k, dtype=dtype, device=self.values.device)
        dense[entry_rows(self.row_ptr, self.nnz), self.col_idx.long()] = self.values.to(dtype)
        return dense


def check_csr(csr: CSR) -> None:
    """Raise ValueError unless ``csr`` is a valid CSR matrix of its shape whose columns strictly ascend
    within each row: the CUDA kernels read every row through a forward-only cursor and add entries
    without atomics, so an unsorted or duplicated entry would be dropped or raced, not reported."""
    n, k = csr.shape
    nnz = csr.values.numel()
    if csr.row_ptr.numel() != n + 1 or csr.col_idx.numel() != nnz:
        raise ValueError(f"ortho CSR of shape {(n, k)}: expected {n + 1} row pointers and one column per value, "
                         f"got {csr.row_ptr.numel()} row pointers, {csr.col_idx.numel()} columns, {nnz} values")
    rp = csr.row_ptr.long()
    if rp[0].item() != 0 or rp[-1].item() != nnz or bool((rp[1:] < rp[:-1]).any()):
        raise ValueError(f"ortho CSR row pointers must start at 0, never decrease and end at nnz={nnz}")
    if nnz == 0:
        return
    col = csr.col_idx.long()
    if col.min().item() < 0 or col.max().item() >= k:
        raise ValueError(f"ortho CSR column index out of range [0, {k}): min {col.min().item()}, "
                         f"max {col.max().item()}")
    flat = entry_rows(rp, nnz) * k + col
    if bool((flat[1:] <= flat[:-1]).any()):
        raise ValueError("ortho CSR columns must strictly ascend within each row (sorted, no duplicates)")


def col_dtype_for(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def empty_csr(shape: tuple[int, int], value_dtype=torch.float16, device=None) -> CSR:
    return CSR(torch.zeros(shape[0] + 1, dtype=torch.int32, device=device),
               torch.zeros(0, dtype=col_dtype_for(shape[1]), device=device),
               torch.zeros(0, dtype=value_dtype, device=device), tuple(shape))


def csr_from_indices(values_dense: torch.Tensor, flat_idx: torch.Tensor,
                     value_dtype=torch.float16) -> CSR:
    """CSR holding ``values_dense`` at the given (ascending) flat indices."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"ortho value dtype {value_dtype} is not supported; expected one of {VALUE_DTYPES}")
    n, k = values_dense.shape
    flat_idx = flat_idx.to(values_dense.device)
    rows = torch.div(flat_idx, k, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=n)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=values_dense.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return CSR(row_ptr.to(torch.int32), (flat_idx % k).to(col_dtype_for(k)),
               values_dense.reshape(-1)[flat_idx].to(value_dtype), (n, k))


def sieve(residual: torch.Tensor, density: float, score: str = "magnitude",
          hessian: torch.Tensor | None = None, seed: int = 0, value_dtype=torch.float16) -> CSR:
    """Keep exactly ortho_count(density, numel) entries of the residual, chosen by score."""
    check_density(density)
    k = ortho_count(density, residual.numel())
    idx = select_topk(scores(residual, score, hessian, seed), k)
    return csr_from_indices(residual, idx, value_dtype)
