"""Split one linear layer into base + ortho according to an OrthoConfig."""
from __future__ import annotations

import torch

from . import quant
from .config import OrthoConfig
from .gptq import gptq_decompose
from .layer import OrthoLinear
from .sieve import csr_from_indices, ortho_count, scores, select_topk


def split_linear(weight: torch.Tensor, bias: torch.Tensor | None, config: OrthoConfig,
                 hessian: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                 device=None) -> OrthoLinear:
    """weight (N, K) -> OrthoLinear. ``ref_weight`` is the delta mode's base (same shape).

    Delta mode sieves ``E = (W - W_ref) + R_ref``, where ``R_ref`` is what the method itself would put
    in the ortho stream of the reference: the whole residual ``W_ref - deq(Q_ref)`` for RTN (so E is
    ``W - deq(Q_ref)``), the in-sweep entries for GPTQ. With ``W_ref == W`` this is exactly the
    self-mode decomposition.
    """
    device = device or (hessian.device if hessian is not None else weight.device)
    W = weight.detach().to(device=device, dtype=torch.float32)
    delta = config.base_from == "reference"
    if delta and (ref_weight is None or ref_weight.shape != W.shape):
        raise ValueError(f"delta mode needs a reference weight of shape {tuple(W.shape)}, got "
                         f"{None if ref_weight is None else tuple(ref_weight.shape)}")
    if config.needs_calibration and hessian is None:
        raise ValueError(f"method={config.method!r} with score={config.score!r} needs the layer Hessian "
                         "(pass calibration data: decompose(model, config, calib=...))")
    base_W = ref_weight.detach().to(device=device, dtype=torch.float32) if delta else W
    dtype = config.torch_dtype
    if config.method == "gptq":
        codes, grid, csr = gptq_decompose(
            base_W, hessian.to(device), config.bits, config.group_size, config.symmetric,
            config.density, config.score, config.damp, config.act_order, config.block_size,
            dtype, dtype, config.seed, config.clip_search)
        residual = None if csr is None else csr.to_dense()
    else:
        grid = quant.make_grid(base_W, config.bits, config.group_size, config.symmetric, dtype)
        codes = quant.quantize_with_grid(base_W, grid)
        residual = base_W - quant.dequantize(codes, grid) if config.has_ortho else None
        csr = None
    if config.has_ortho and (delta or config.method == "rtn"):
        support = csr.to_dense() != 0 if csr is not None else None
        target = residual + (W - base_W) if delta else residual
        sc = scores(target, config.score, hessian, config.seed)
        idx = select_topk(sc, ortho_count(config.density, W.numel()), prefer=support)
        csr = csr_from_indices(target, idx, dtype)
    return OrthoLinear.pack(codes, grid, csr, bias, dtype)
