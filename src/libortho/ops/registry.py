"""The one op every OrthoLinear forward goes through: ``torch.ops.libortho.ortho_linear``.

Defined with ``torch.library.custom_op`` (so ``torch.compile`` treats it as one opaque node, traced
through its fake implementation). The default implementation is the pure-PyTorch reference; the CUDA
backend (``libortho.ops.cuda``) registers itself for the CUDA dispatch key when its extension builds.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .reference import glu_from_interleaved, ortho_linear_reference


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
