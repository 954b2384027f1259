"""Pure-PyTorch backend of ``libortho::ortho_linear`` (and its GLU and RMSNorm forms): the ground truth, on any device.

Everything is computed in fp32 from the packed buffers and cast to the activation dtype at the end:
``y = x @ (deq(Q) + alpha * S)^T + bias``, with S scattered into a dense matrix (cheaper than a sparse
product at the densities used here, and exact). At ``alpha == 0`` the ortho arrays are never read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import dequantize_packed
from ..sieve import entry_rows
from .cpu_cache import CACHE


def scatter_csr(w: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """w (N, K) fp32 += alpha * S for the CSR matrix S, in place; returns w."""
    if values.numel():
        w.index_put_((entry_rows(row_ptr, values.numel()), col_idx.long()), alpha * values.float(), accumulate=True)
    return w


def merged_weight_float(qweight, scales, zeros, row_ptr, col_idx, values, alpha: float, bits: int,
                        group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """deq(Q) + alpha * S, (out_features, in_features) fp32, built afresh from the packed buffers."""
    w = dequantize_packed(qweight, scales, zeros, bits, group_size, out_features, in_features)
    if alpha != 0.0:  # the kill switch: at alpha == 0 the ortho arrays are never read
        scatter_csr(w, row_ptr, col_idx, values, alpha)
    return w


def ortho_product_float(x, qweight, scales, zeros, row_ptr, col_idx, values, alpha: float, bits: int,
                        group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """x @ (deq(Q) + alpha * S)^T in fp32, (..., out_features), no bias. On the CPU the merged weight comes from
    cpu_cache when this layer's buffers and alpha are those of an earlier call (the same bits, not rebuilt)."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features).float()
    args = (qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size, out_features, in_features)
    read = (qweight, scales) + (() if zeros is None else (zeros,))
    if alpha != 0.0:
        read += (row_ptr, col_idx, values)
    w = CACHE.get(read, (alpha, bits, group_size, out_features, in_features), lambda: merged_weight_float(*args))
    return (x2d @ w.t()).reshape(*lead, out_features)


def ortho_linear_reference(x, qweight, scales, zeros, row_ptr, col_idx, values, bias,
                           alpha: float, bits: int, group_size: int, out_features: int,
                           in_features: int) -> torch.Tensor:
    y = ortho_product_float(x, qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size,
                            out_features, in_features)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


NORM_TILE = 16  # libortho.norms: features per partial sum of squares (the decode kernel's row tile)


def add_norm_reference(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """From a product y (..., N) in the activation dtype: ``(stack(h, weight * h), part)`` with h = residual + y and
    part (..., N / 16) the fp32 sums of squares of h per 16 features, each step rounded as transformers' eager
    decoder layer and RMSNorm round it (the norm's division by the RMS is left to the consumer: rms_scale)."""
    h = (residual.float() + y.float()).to(y.dtype)
    _, gh, part = norm_carry(h, weight)
    return torch.stack([h, gh]), part


def norm_carry(h: torch.Tensor, weight: torch.Tensor):
    """``(h, weight * h, part)``: what a layer hands the next product (eager's rounding of the weight's product; part
    the fp32 sums of squares of h per 16 features)."""
    return h, (weight.float() * h.float()).to(h.dtype), h.float().square().unflatten(-1, (-1, NORM_TILE)).sum(-1)


def rms_scale(part: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS of the rows whose partial sums of squares ``part`` (..., K / 16) holds: (..., 1), fp32."""
    return torch.rsqrt(part.float().sum(-1, keepdim=True) / (NORM_TILE * part.shape[-1]) + eps)


def rms_finish(y: torch.Tensor, part: torch.Tensor, eps: float, bias, dtype: torch.dtype) -> torch.Tensor:
    """A product's sums y (..., N) scaled by rms_scale(part), plus the bias, rounded to dtype once."""
    y = y.float() * rms_scale(part, eps).reshape(*y.shape[:-1], 1)
    return (y if bias is None else y + bias.float()).to(dtype)


GLU_ROWS = 8  # libortho.glu: rows of gate, then of up, in each 16-row tile of the product


def glu_from_interleaved(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from a product of rows interleaved by GLU_ROWS (..., 2 R) -> (..., R), each step rounded
    to y's dtype (transformers' eager ``act_fn(gate_proj(x)) * up_proj(x)``)."""
    pairs = y.unflatten(-1, (-1, 2, GLU_ROWS))
    return (F.silu(pairs[..., 0, :]) * pairs[..., 1, :]).flatten(-2)
