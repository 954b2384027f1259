"""Sibling OrthoLinears that read the same input (q/k/v, gate/up) run as one launch.

At batch 1 every launch of the decode kernel pays a few microseconds that do not depend on its size
(launch, the first loads' latency, the last wave's tail), so one 12288 x 4096 product is cheaper than
three 4096 x 4096 ones. :func:`fuse_siblings` concatenates each group's packed buffers along the output
dimension into an :class:`OrthoGroup` (registered on the members' parent) and turns the members' buffers
into views of it, so nothing is stored twice. The members stay where they were, with their own alpha:

* the first member called runs the whole group's product once, when every member has the same alpha,
  and keeps the other members' slices until they are called with the same input tensor;
* with different alphas, or called on another input, a member runs alone on its views.

The model's code is not changed (transformers' attention calls q_proj, k_proj and v_proj on one tensor,
its MLP gate_proj and up_proj), and ``torch.compile(fullgraph=True)`` traces the hand-over: the graph holds
one product per group. Fusing is a run-time layout: save, cast or move the model before it (or after
:func:`unfuse_siblings`).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import LibOrthoError
from .layer import OrthoLinear, run_packed
from .quant import TILE_N

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SAME = ("in_features", "bits", "group_size", "symmetric")
_SAME_DTYPE = ("qweight", "scales", "zeros", "row_ptr", "col_idx", "values", "bias")


def why_not_fusable(members: list[OrthoLinear]) -> str | None:
    """None when the layers can share one launch, else what keeps them apart."""
    first = members[0]
    for m in members[1:]:
        for key in _SAME:
            if getattr(m, key) != getattr(first, key):
                return f"{key} differs ({getattr(first, key)} vs {getattr(m, key)})"
        for key in _SAME_DTYPE:
            a, b = getattr(first, key), getattr(m, key)
            if (a is None) != (b is None) or (a is not None and (a.dtype, a.device) != (b.dtype, b.device)):
                return f"{key} differs in presence, dtype or device"
        if m._group is not None:
            return "already fused"
    if first._group is not None:
        return "already fused"
    if any(m.out_features % TILE_N for m in members[:-1]):
        return f"out_features of all but the last must be multiples of {TILE_N} (the packed tile height)"
    if sum(m.ortho_nnz for m in members) >= 2 ** 31:
        return "more than 2^31 - 1 ortho entries in all"
    return None


class OrthoGroup(nn.Module):
    """The concatenated buffers of sibling OrthoLinears, and the hand-over of their outputs."""

    def __init__(self, members: list[OrthoLinear]):
        super().__init__()
        why = why_not_fusable(members)
        if why is not None:
            raise LibOrthoError(f"cannot fuse these layers: {why}")
        first = members[0]
        self.in_features, self.bits, self.group_size = first.in_features, first.bits, first.group_size
        self.sizes = [m.out_features for m in members]
        self.out_features = sum(self.sizes)
        self._members = list(members)  # a plain list: the members stay registered where they are
        self._stash = None             # (input, alpha, outputs) of the last fused product not yet handed out
        self._left = 0
        cat = lambda key: torch.cat([getattr(m, key) for m in members])  # noqa: E731
        self.register_buffer("qweight", cat("qweight"))
        self.register_buffer("scales", cat("scales"))
        self.register_buffer("zeros", None if first.zeros is None else cat("zeros"))
        self.register_buffer("col_idx", cat("col_idx"))
        self.register_buffer("values", cat("values"))
        self.register_buffer("bias", None if first.bias is None else cat("bias"))
        offsets = [0]
        for m in members:
            offsets.append(offsets[-1] + m.ortho_nnz)
        self.register_buffer("row_ptr", torch.cat([first.row_ptr[:1]] + [m.row_ptr[1:] + o
                                                                        for m, o in zip(members, offsets)]))
        self._point_members_here(offsets)

    def _point_members_here(self, offsets: list[int]) -> None:
        tile = 0
        for i, m in enumerate(self._members):
            tiles = -(-m.out_features // TILE_N)
            for key in ("qweight", "scales", "zeros"):
                if getattr(m, key) is not None:
                    setattr(m, key, getattr(self, key)[tile:tile + tiles])
            m.col_idx, m.values = self.col_idx[offsets[i]:offsets[i + 1]], self.values[offsets[i]:offsets[i + 1]]
            if m.bias is not None:
                start = sum(self.sizes[:i])
                m.bias = self.bias[start:start + m.out_features]
            object.__setattr__(m, "_group", self)
            object.__setattr__(m, "_group_index", i)
            tile += tiles

    def output(self, member: OrthoLinear, x: torch.Tensor) -> torch.Tensor:
        """What ``member(x)`` returns: its slice of one fused product where it can, else its own product."""
        stash, alpha = self._stash, member.alpha
        if stash is not None and stash[0] is x and stash[1] == alpha:
            self._left -= 1
            if self._left == 0:
                self._stash = None
            return stash[2][member._group_index]
        if any(m.alpha != alpha for m in self._members):
            return member.forward_alone(x)
        outs = torch.split(run_packed(self, x, alpha), self.sizes, dim=-1)
        self._stash, self._left = (x, alpha, outs), len(self.sizes) - 1
        return outs[member._group_index]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}, ortho_nnz={self.values.numel()}"


def fuse_siblings(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuse every group of sibling OrthoLinears named in ``groups`` (all present under one parent);
    returns the names of the fused groups. Groups that cannot share a launch are left as they are."""
    done = []
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, OrthoLinear) for m in members) or why_not_fusable(members) is not None:
                continue
            attr = "fused_" + "_".join(names)
            parent.add_module(attr, OrthoGroup(members))
            done.append(f"{parent_name}.{attr}" if parent_name else attr)
    return done


def fused_groups(model: nn.Module) -> list[tuple[str, OrthoGroup]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OrthoGroup)]


def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings`: every member gets its own buffers back; returns how many groups."""
    found = fused_groups(model)
    for name, group in found:
        for m in group._members:
            for key in ("qweight", "scales", "zeros", "col_idx", "values", "bias"):
                if getattr(m, key) is not None:
                    setattr(m, key, getattr(m, key).clone())
            object.__setattr__(m, "_group", None)
        parent_name, _, attr = name.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, attr)
    return len(found)


def refuse_fused(model: nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (save, cast) meets a fused model."""
    if fused_groups(model):
        raise LibOrthoError(f"{what} needs the model unfused: its sibling layers share buffers "
                            "(libortho.fuse_siblings); call libortho.unfuse_siblings(model) first")
