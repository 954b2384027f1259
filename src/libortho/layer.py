"""OrthoLinear: a linear layer stored as a packed low-bit base plus a sparse ortho stream."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import quant
from .ops import check_inputs
from .sieve import CSR, check_csr, check_density, col_dtype_for, empty_csr, sieve

_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_alpha(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"alpha must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"alpha must be finite, got {value!r}")
    return value


class OrthoLinear(nn.Module):
    """``y = x @ deq(Q)^T + alpha * x @ S^T + bias``; ``alpha == 0`` never touches S.

    Buffers: ``qweight`` (packed codes, see :mod:`libortho.quant`), ``scales`` and, when asymmetric,
    ``zeros`` in tile layout, the CSR arrays ``row_ptr``/``col_idx``/``values`` and ``bias``.
    Floating buffers follow ``.to(dtype)`` like any module's.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 symmetric: bool = True, nnz: int = 0, bias: bool = False,
                 dtype=torch.float16, value_dtype=None, bias_dtype=None, device=None):
        super().__init__()
        quant.check_bits(bits)
        quant.check_group_size(group_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.symmetric = bits, group_size, bool(symmetric)
        n_pad, k_pad = quant.padded_shape(out_features, in_features)
        groups = quant.num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(n_pad // 16, k_pad // 64, 32 * bits,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(n_pad // 16, groups, 16, dtype=dtype, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.zeros(n_pad // 16, groups, 16, dtype=dtype, device=device))
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_idx", torch.zeros(nnz, dtype=col_dtype_for(in_features), device=device))
        self.register_buffer("values", torch.zeros(nnz, dtype=value_dtype or dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype or dtype, device=device) if bias else None)
        self._alpha = 1.0

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def pack(cls, codes: torch.Tensor, grid: quant.QuantGrid, csr: CSR | None,
             bias: torch.Tensor | None = None, dtype=torch.float16) -> "OrthoLinear":
        """Build from integer codes (N, K), their grid, an ortho CSR (or None) and a bias."""
        n, k = codes.shape
        csr = csr or empty_csr((n, k), value_dtype=dtype, device=codes.device)
        if csr.shape != (n, k):
            raise ValueError(f"ortho CSR has shape {csr.shape}, expected {(n, k)}")
        check_csr(csr)
        layer = cls(k, n, grid.bits, grid.group_size, grid.zeros is None, csr.nnz, bias is not None,
                    dtype=dtype, value_dtype=csr.values.dtype,
                    bias_dtype=None if bias is None else bias.dtype, device=codes.device)
        layer.qweight.copy_(quant.pack(codes, grid.bits))
        layer.scales.copy_(quant.pack_group_params(grid.scales.to(dtype)))
        if grid.zeros is not None:
            layer.zeros.copy_(quant.pack_group_params(grid.zeros.to(dtype)))
        layer.row_ptr.copy_(csr.row_ptr)
        layer.col_idx.copy_(csr.col_idx)
        layer.values.copy_(csr.values)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = True, density: float = 0.01, score: str = "magnitude",
                    hessian: torch.Tensor | None = None, seed: int = 0,
                    dtype=torch.float16, value_dtype=torch.float16) -> "OrthoLinear":
        """Round-to-nearest base plus the sieved residual (density 0: base only)."""
        w = linear.weight.detach().float()
        codes, grid = quant.quantize(w, bits, group_size, symmetric, scale_dtype=dtype)
        csr = None
        if check_density(density, allow_zero=True) > 0:
            residual = w - quant.dequantize(codes, grid)
            csr = sieve(residual, density, score, hessian, seed, value_dtype)
        return cls.pack(codes, grid, csr, linear.bias, dtype)

    # -- views --------------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._alpha = check_alpha(value)

    @property
    def ortho_nnz(self) -> int:
        return int(self.values.numel())

    def grid(self) -> quant.QuantGrid:
        return quant.QuantGrid(quant.unpack_group_params(self.scales, self.out_features),
                               None if self.zeros is None else
                               quant.unpack_group_params(self.zeros, self.out_features),
                               self.bits, self.group_size)

    def codes(self) -> torch.Tensor:
        return quant.unpack(self.qweight, self.bits, self.out_features, self.in_features)

    def base_weight(self, dtype=torch.float32) -> torch.Tensor:
        return quant.dequantize(self.codes(), self.grid(), dtype)

    def ortho(self) -> CSR:
        return CSR(self.row_ptr, self.col_idx, self.values, (self.out_features, self.in_features))

    def dense_weight(self, alpha: float | None = None) -> torch.Tensor:
        """deq(Q) + alpha * S in fp32 (for tests and analysis)."""
        a = self.alpha if alpha is None else alpha
        w = self.base_weight()
        return w + a * self.ortho().to_dense() if a != 0 else w

    def storage_bytes(self) -> dict:
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        # an empty ortho stream is never read (not even row_ptr), so it need not be counted as stored
        ortho = size(self.row_ptr) + size(self.col_idx) + size(self.values) if self.ortho_nnz else 0
        return {"base": size(self.qweight), "scales": size(self.scales), "zeros": size(self.zeros),
                "ortho": ortho, "bias": size(self.bias)}

    # -- forward ------------------------------------------------------------------------------------
    _group = None  # the OrthoGroup whose buffers this layer's are views of (libortho.fuse_siblings)
    _group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is not None:
            return self._group.output(self, x)
        return self.forward_alone(x)

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        return run_packed(self, x, self._alpha)

    def extra_repr(self) -> str:
        g = "row" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={g}, symmetric={self.symmetric}, ortho_nnz={self.ortho_nnz}, "
                f"alpha={self._alpha}")


def run_packed(layer, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The op on ``layer``'s packed buffers (an OrthoLinear or a fused group of them)."""
    check_inputs(x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx,
                 layer.values, layer.bias, alpha, layer.bits, layer.out_features, layer.in_features)
    return torch.ops.libortho.ortho_linear(
        x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values,
        layer.bias, alpha, layer.bits, quant.effective_group_size(layer.group_size, layer.in_features),
        layer.out_features, layer.in_features)
