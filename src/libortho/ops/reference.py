"""Pure-PyTorch backend of ``libortho::ortho_linear``: the ground truth, on any device.

Everything is computed in fp32 from the packed buffers and cast to the activation dtype at the end.
"""
from __future__ import annotations

import torch

from ..quant import dequantize_packed

_CHUNK_ELEMS = 1 << 26  # bound the (rows x nnz) gather buffer


def csr_matmul(x2d: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               values: torch.Tensor, out_features: int) -> torch.Tensor:
    """x2d (M, K) fp32 @ S^T for the CSR matrix S (N, K): (M, N) fp32."""
    m = x2d.shape[0]
    out = torch.zeros(m, out_features, dtype=torch.float32, device=x2d.device)
    nnz = values.numel()
    if nnz == 0 or m == 0:
        return out
    rows = torch.repeat_interleave(torch.arange(out_features, device=x2d.device),
                                   (row_ptr[1:] - row_ptr[:-1]).long())
    cols = col_idx.long()
    vals = values.float()
    step = max(1, _CHUNK_ELEMS // nnz)
    for i in range(0, m, step):
        contrib = x2d[i:i + step, cols] * vals
        out[i:i + step].index_add_(1, rows, contrib)
    return out


def ortho_linear_reference(x, qweight, scales, zeros, row_ptr, col_idx, values, bias,
                           alpha: float, bits: int, group_size: int, out_features: int,
                           in_features: int) -> torch.Tensor:
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).float()
    w = dequantize_packed(qweight, scales, zeros, bits, group_size, out_features, in_features)
    y = x2d @ w.t()
    if alpha != 0.0:  # the kill switch: at alpha == 0 the ortho arrays are never read
        y += alpha * csr_matmul(x2d, row_ptr, col_idx, values, out_features)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, out_features)
