"""The one op every OrthoLinear forward goes through: ``torch.ops.libortho.ortho_linear``.

Defined with ``torch.library.custom_op`` (so ``torch.compile`` treats it as one opaque node, traced
through its fake implementation). The default implementation is the pure-PyTorch reference; the CUDA
backend (``libortho.ops.cuda``) registers itself for the CUDA dispatch key when its extension builds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .reference import (NORM_TILE, add_norm_reference, glu_from_interleaved, ortho_linear_reference,
                        ortho_product_float, rms_finish)


def check_inputs(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits,
                 out_features, in_features) -> None:
    """Clear errors for what a caller can get wrong; cheap (no device synchronization)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16 or float32), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., {in_features}) (in_features)")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but the layer's weights are on {qweight.device}; "
                         "move the input or the model so they match")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if row_ptr.numel() != out_features + 1:
        raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected out_features + 1 = {out_features + 1}")
    if col_idx.numel() != values.numel():
        raise ValueError(f"col_idx ({col_idx.numel()}) and values ({values.numel()}) differ in length")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")


@torch.library.custom_op("libortho::ortho_linear", mutates_args=())
def ortho_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 values: torch.Tensor, bias: Optional[torch.Tensor], alpha: float, bits: int,
                 group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """y = x @ deq(Q)^T + alpha * x @ S^T (+ bias). group_size here is the effective one (> 0)."""
    return ortho_linear_reference(x, qweight, scales, zeros, row_ptr, col_idx, values, bias,
                                  alpha, bits, group_size, out_features, in_features)


@ortho_linear.register_fake
def _(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
      out_features, in_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("libortho::ortho_glu", mutates_args=())
def ortho_glu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: Optional[torch.Tensor], row_ptr: torch.Tensor, col_idx: torch.Tensor,
              values: torch.Tensor, bias: Optional[torch.Tensor], alpha: float, bits: int,
              group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """silu(gate) * up from ortho_linear's product of rows interleaved by 8 (libortho.glu): (..., out_features / 2),
    each step rounded to x's dtype as transformers' eager MLP rounds it."""
    return glu_from_interleaved(ortho_linear_reference(x, qweight, scales, zeros, row_ptr, col_idx, values, bias,
                                                       alpha, bits, group_size, out_features, in_features))


@ortho_glu.register_fake
def _(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
      out_features, in_features):
    return x.new_empty(*x.shape[:-1], out_features // 2)


# The RMSNorm around the products (libortho.norms): a residual-adding product writes h, g * h and h's sums of squares
# per 16 features; the next product reads g * h and scales its sums by h's 1 / RMS. W (g * h) r = r (W (g * h)), so
# the normalized input never exists: no norm kernel between the products.

@torch.library.custom_op("libortho::ortho_linear_add_norm", mutates_args=())
def ortho_linear_add_norm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: Optional[torch.Tensor], row_ptr: torch.Tensor, col_idx: torch.Tensor,
                          values: torch.Tensor, bias: Optional[torch.Tensor], alpha: float, bits: int,
                          group_size: int, out_features: int, in_features: int, residual: torch.Tensor,
                          norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stack(h, norm_weight * h), part)``: h = residual + ortho_linear(x) (2, ..., N) and part (..., N / 16) fp32,
    h's sums of squares per 16 features (reference.add_norm_reference)."""
    y = ortho_linear_reference(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                               out_features, in_features)
    return add_norm_reference(y, residual, norm_weight)


@ortho_linear_add_norm.register_fake
def _(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features, in_features,
      residual, norm_weight):
    return (x.new_empty(2, *x.shape[:-1], out_features),
            x.new_empty(*x.shape[:-1], out_features // NORM_TILE, dtype=torch.float32))


def _rms_product(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features,
                 in_features, part, eps):
    return rms_finish(ortho_product_float(x, qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size,
                                          out_features, in_features), part, eps, bias, x.dtype)


@torch.library.custom_op("libortho::ortho_linear_rms", mutates_args=())
def ortho_linear_rms(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: Optional[torch.Tensor], row_ptr: torch.Tensor, col_idx: torch.Tensor,
                     values: torch.Tensor, bias: Optional[torch.Tensor], alpha: float, bits: int,
                     group_size: int, out_features: int, in_features: int, part: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """``r * (x @ (deq(Q) + alpha S)^T) + bias`` with r = 1 / RMS of the rows part (..., K / 16) sums up (fp32, then
    rounded): the layer applied to x normalized by the RMS of the h whose g * h x is."""
    return _rms_product(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                        out_features, in_features, part, eps)


@ortho_linear_rms.register_fake
def _(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features, in_features,
      part, eps):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("libortho::ortho_glu_rms", mutates_args=())
def ortho_glu_rms(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: Optional[torch.Tensor], row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  values: torch.Tensor, bias: Optional[torch.Tensor], alpha: float, bits: int,
                  group_size: int, out_features: int, in_features: int, part: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """silu(gate) * up of ortho_linear_rms's product (rows interleaved by 8, libortho.glu), (..., out_features / 2)."""
    return glu_from_interleaved(_rms_product(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits,
                                             group_size, out_features, in_features, part, eps))


@ortho_glu_rms.register_fake
def _(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features, in_features,
      part, eps):
    return x.new_empty(*x.shape[:-1], out_features // 2)
