"""A SiLU-gated MLP's gate_proj and up_proj as one layer whose product comes out as ``silu(gate) * up``.

At batch 1 every launch of the decode kernel and of the compiled elementwise code around it costs a few
microseconds whatever its size. :func:`fuse_glu` replaces an MLP's two decomposed projections by one
:class:`OrthoGLU` whose rows are the two layers' interleaved by eight (rows 16 t .. 16 t + 7 of the product are
gate's 8 t .. 8 t + 7, the next eight up's), so each 16-row tile of the decode kernel holds a gate row and its
up row together and its epilogue writes ``silu(gate) * up`` itself: no separate activation kernel, half the
output bytes. The MLP runs ``down_proj(glu_proj(x))``.

The product is transformers' eager chain, each step rounded to the activation dtype: ``act_fn(gate_proj(x)) *
up_proj(x)``. The two layers share one alpha while fused (a pattern given to ``set_alpha`` names ``glu_proj`` then).
It is a run-time layout, like :func:`libortho.fuse_siblings`: save or cast after :func:`unfuse_glu`, which gives
the two layers back.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from . import quant
from .errors import LibOrthoError
from .layer import OrthoLinear
from .ops import check_inputs
from .ops.reference import GLU_ROWS as ROWS
from .ops.reference import glu_from_interleaved  # noqa: F401  (the op's semantics, for callers and tests)
from .sieve import CSR


def interleave_order(rows: int, device=None) -> torch.Tensor:
    """Row i of the product is row ``order[i]`` of ``cat(gate, up)`` (``rows`` rows each)."""
    i = torch.arange(2 * rows, device=device)
    tile, r = i // (2 * ROWS), i % (2 * ROWS)
    return torch.where(r < ROWS, tile * ROWS + r, rows + tile * ROWS + r - ROWS)


def permute_csr_rows(csr: CSR, order: torch.Tensor) -> CSR:
    """The CSR whose row i is row ``order[i]`` of ``csr``."""
    counts = (csr.row_ptr[1:] - csr.row_ptr[:-1]).long()
    new_counts = counts[order]
    row_ptr = torch.zeros_like(csr.row_ptr)
    row_ptr[1:] = new_counts.cumsum(0).to(row_ptr.dtype)
    nnz = int(row_ptr[-1])
    shift = torch.repeat_interleave(csr.row_ptr[:-1].long()[order] - row_ptr[:-1].long(), new_counts,
                                    output_size=nnz)
    src = shift + torch.arange(nnz, device=shift.device)
    return CSR(row_ptr, csr.col_idx[src], csr.values[src], (len(order), csr.shape[1]))


def _cat_csr(a: CSR, b: CSR) -> CSR:
    row_ptr = torch.cat([a.row_ptr, b.row_ptr[1:] + a.row_ptr[-1]])
    return CSR(row_ptr, torch.cat([a.col_idx, b.col_idx]), torch.cat([a.values, b.values]),
               (a.shape[0] + b.shape[0], a.shape[1]))


class OrthoGLU(OrthoLinear):
    """``silu(x @ G^T) * (x @ U^T)`` of two OrthoLinears G and U stored as one of interleaved rows (see the module
    docstring); ``out_features`` counts the product's rows (twice the output's)."""

    @classmethod
    def from_pair(cls, gate: OrthoLinear, up: OrthoLinear) -> "OrthoGLU":
        n = gate.out_features
        order = interleave_order(n, gate.qweight.device)
        g, u = gate.grid(), up.grid()
        grid = quant.QuantGrid(torch.cat([g.scales, u.scales])[order],
                               None if g.zeros is None else torch.cat([g.zeros, u.zeros])[order],
                               gate.bits, gate.group_size)
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])[order]
        layer = cls.pack(torch.cat([gate.codes(), up.codes()])[order], grid,
                         permute_csr_rows(_cat_csr(gate.ortho(), up.ortho()), order), bias, gate.scales.dtype)
        layer.alpha = gate.alpha
        return layer

    def split(self) -> tuple[OrthoLinear, OrthoLinear]:
        """The two layers back (gate, up), with this layer's alpha."""
        n = self.out_features // 2
        back = torch.argsort(interleave_order(n, self.qweight.device))  # rows of cat(gate, up) in product order
        codes, grid, csr = self.codes()[back], self.grid(), permute_csr_rows(self.ortho(), back)
        scales, zeros = grid.scales[back], None if grid.zeros is None else grid.zeros[back]
        bias = None if self.bias is None else self.bias[back]
        out = []
        for rows in (slice(0, n), slice(n, 2 * n)):
            part = CSR(csr.row_ptr[rows.start:rows.stop + 1] - csr.row_ptr[rows.start],
                       csr.col_idx[int(csr.row_ptr[rows.start]):int(csr.row_ptr[rows.stop])],
                       csr.values[int(csr.row_ptr[rows.start]):int(csr.row_ptr[rows.stop])], (n, self.in_features))
            g = quant.QuantGrid(scales[rows], None if zeros is None else zeros[rows], self.bits, self.group_size)
            layer = OrthoLinear.pack(codes[rows], g, part, None if bias is None else bias[rows], self.scales.dtype)
            layer.alpha = self.alpha
            out.append(layer)
        return out[0], out[1]

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        check_inputs(x, self.qweight, self.scales, self.zeros, self.row_ptr, self.col_idx, self.values, self.bias,
                     self._alpha, self.bits, self.out_features, self.in_features)
        return torch.ops.libortho.ortho_glu(
            x, self.qweight, self.scales, self.zeros, self.row_ptr, self.col_idx, self.values, self.bias,
            self._alpha, self.bits, quant.effective_group_size(self.group_size, self.in_features),
            self.out_features, self.in_features)


def why_not_glu(mlp: nn.Module) -> str | None:
    """None when ``mlp``'s gate_proj and up_proj can become one OrthoGLU, else what keeps them apart."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not isinstance(gate, OrthoLinear) or not isinstance(up, OrthoLinear) or not hasattr(mlp, "down_proj"):
        return "no decomposed gate_proj and up_proj beside a down_proj"
    act = type(getattr(mlp, "act_fn", None))
    if act is not nn.SiLU and not (act.__name__ == "SiLUActivation" and act.__module__.startswith("transformers.")):
        return f"activation {act.__name__}, not SiLU"  # (transformers' SiLUActivation is F.silu)
    if gate._group is not None or up._group is not None:
        return "already fused as siblings (libortho.fuse_siblings)"
    for key in ("in_features", "out_features", "bits", "group_size", "symmetric", "alpha"):
        if getattr(gate, key) != getattr(up, key):
            return f"{key} differs ({getattr(gate, key)} vs {getattr(up, key)})"
    for key in ("qweight", "scales", "zeros", "values", "bias"):
        a, b = getattr(gate, key), getattr(up, key)
        if (a is None) != (b is None) or (a is not None and (a.dtype, a.device) != (b.dtype, b.device)):
            return f"{key} differs in presence, dtype or device"
    if gate.out_features % ROWS:
        return f"out_features {gate.out_features} is not a multiple of {ROWS}"
    return None


def _glu_mlp_forward(self, x):
    return self.down_proj(self.glu_proj(x))


def fuse_glu(model: nn.Module) -> list[str]:
    """Replace each SiLU-gated MLP's decomposed gate_proj and up_proj by one :class:`OrthoGLU` (``glu_proj``);
    returns the MLPs' names. Run it before :func:`libortho.fuse_siblings` (which would group gate and up)."""
    done = []
    for name, mlp in list(model.named_modules()):
        if why_not_glu(mlp) is not None:
            continue
        mlp.glu_proj = OrthoGLU.from_pair(mlp.gate_proj, mlp.up_proj)
        del mlp.gate_proj, mlp.up_proj
        mlp.forward = types.MethodType(_glu_mlp_forward, mlp)
        done.append(name)
    return done


def unfuse_glu(model: nn.Module) -> int:
    """Undo :func:`fuse_glu`: gate_proj and up_proj back, the MLP's own forward; returns how many MLPs."""
    found = [m for m in model.modules() if isinstance(getattr(m, "glu_proj", None), OrthoGLU)]
    for mlp in found:
        mlp.gate_proj, mlp.up_proj = mlp.glu_proj.split()
        del mlp.glu_proj
        if "forward" in vars(mlp):
            del mlp.forward
    return len(found)


def glu_layers(model: nn.Module) -> list[OrthoGLU]:
    return [m for m in model.modules() if isinstance(m, OrthoGLU)]


def refuse_glu(model: nn.Module, what: str) -> None:
    if glu_layers(model):
        raise LibOrthoError(f"{what} needs the model unfused: gate_proj and up_proj are one interleaved layer "
                            "(libortho.fuse_glu); call libortho.unfuse_glu(model) first")
