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
:func:`unfuse_siblings`). :func:`fuse_linear_siblings` does the same for plain bf16/fp16 ``nn.Linear``
siblings (one ``F.linear`` per group): the control for what fusing alone is worth to a dense model.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LibOrthoError
from .glu import refuse_glu
from .layer import OrthoLinear, run_packed
from .quant import TILE_N

DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_SAME = ("in_features", "bits", "group_size", "symmetric")
_SAME_DTYPE = ("qweight", "scales", "zeros", "row_ptr", "col_idx", "values", "bias")


def why_not_fusable(members: list[OrthoLinear]) -> str | None:
    """None when the layers can share one launch, else what keeps them apart."""
    if any(m._group is not None for m in members):
        return "already fused"
    first = members[0]
    for m in members[1:]:
        for key in _SAME:
            if getattr(m, key) != getattr(first, key):
                return f"{key} differs ({getattr(first, key)} vs {getattr(m, key)})"
        for key in _SAME_DTYPE:
            a, b = getattr(first, key), getattr(m, key)
            if (a is None) != (b is None) or (a is not None and (a.dtype, a.device) != (b.dtype, b.device)):
                return f"{key} differs in presence, dtype or device"
    if any(m.out_features % TILE_N for m in members[:-1]):
        return f"out_features of all but the last must be multiples of {TILE_N} (the packed tile height)"
    if sum(m.ortho_nnz for m in members) >= 2 ** 31:
        return "more than 2^31 - 1 ortho entries in all"
    return None


class SiblingGroup(nn.Module, abc.ABC):
    """Hands each member its slice of one product of the whole group (see the module docstring); a kind of
    group says how to run that product (``_run``) and what its members must agree on (``_key``)."""

    def _hand_over_to(self, members: list[nn.Module]) -> None:
        self.sizes = [m.out_features for m in members]
        self.in_features, self.out_features = members[0].in_features, sum(self.sizes)
        self._members = list(members)  # a plain list: the members stay registered where they are
        self._stash = None             # (input, key, outputs) of the last fused product not yet handed out
        self._left = 0
        for i, m in enumerate(members):
            object.__setattr__(m, "_group", self)
            object.__setattr__(m, "_group_index", i)

    def _key(self, member) -> object:
        """What must agree between members for one product to serve them all."""
        return None

    @abc.abstractmethod
    def _run(self, x: torch.Tensor, key) -> torch.Tensor:
        """The whole group's product at ``key`` (its members' common key)."""

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``member(x)`` returns: its slice of one fused product where it can, else its own product."""
        stash, key = self._stash, self._key(member)
        if stash is not None and stash[0] is x and stash[1] == key:
            self._left -= 1
            if self._left == 0:
                self._stash = None
            return stash[2][member._group_index]
        if any(self._key(m) != key for m in self._members):
            return member.forward_alone(x)
        outs = torch.split(self._run(x, key), self.sizes, dim=-1)
        self._stash, self._left = (x, key, outs), len(self.sizes) - 1
        return outs[member._group_index]

    def _release_members(self) -> None:
        for m in self._members:
            object.__setattr__(m, "_group", None)


class OrthoGroup(SiblingGroup):
    """The concatenated buffers of sibling OrthoLinears; each member keeps its alpha."""

    def __init__(self, members: list[OrthoLinear]):
        super().__init__()
        why = why_not_fusable(members)
        if why is not None:
            raise LibOrthoError(f"cannot fuse these layers: {why}")
        first = members[0]
        self.bits, self.group_size = first.bits, first.group_size
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
        self._point_members_here(members, offsets)
        self._hand_over_to(members)

    def _point_members_here(self, members: list[OrthoLinear], offsets: list[int]) -> None:
        tile, start = 0, 0
        for i, m in enumerate(members):
            tiles = -(-m.out_features // TILE_N)
            for key in ("qweight", "scales", "zeros"):
                if getattr(m, key) is not None:
                    setattr(m, key, getattr(self, key)[tile:tile + tiles])
            m.col_idx, m.values = self.col_idx[offsets[i]:offsets[i + 1]], self.values[offsets[i]:offsets[i + 1]]
            if m.bias is not None:
                m.bias = self.bias[start:start + m.out_features]
            tile, start = tile + tiles, start + m.out_features

    def _key(self, member: OrthoLinear) -> float:
        return member.alpha

    def _run(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return run_packed(self, x, alpha)

    def _release_members(self) -> None:
        for m in self._members:
            for key in ("qweight", "scales", "zeros", "col_idx", "values", "bias"):
                if getattr(m, key) is not None:
                    setattr(m, key, getattr(m, key).clone())
        super()._release_members()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}, ortho_nnz={self.values.numel()}"


def _fuse(model: nn.Module, groups, kind: type, make, why_not) -> list[str]:
    done = []
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, kind) for m in members) or why_not(members) is not None:
                continue
            attr = "fused_" + "_".join(names)
            parent.add_module(attr, make(members))
            done.append(f"{parent_name}.{attr}" if parent_name else attr)
    return done


def fuse_siblings(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuse every group of sibling OrthoLinears named in ``groups`` (all present under one parent);
    returns the names of the fused groups. Groups that cannot share a launch are left as they are."""
    return _fuse(model, groups, OrthoLinear, OrthoGroup, why_not_fusable)


class _FusedLinear(nn.Linear):
    """An nn.Linear whose weight is a view of its LinearGroup's (the class of a fused member)."""
    _group = None
    _group_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(self, x)

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LinearGroup(SiblingGroup):
    """The concatenated weights (and biases) of sibling nn.Linear layers: one F.linear per group (inference:
    the fused product reads the group's buffer, so no gradient reaches the members' weights)."""

    def __init__(self, members: list[nn.Linear]):
        super().__init__()
        why = why_not_linear_fusable(members)
        if why is not None:
            raise LibOrthoError(f"cannot fuse these layers: {why}")
        self.register_buffer("weight", torch.cat([m.weight.detach() for m in members]))
        self.register_buffer("bias", None if members[0].bias is None else torch.cat([m.bias.detach() for m in members]))
        start = 0
        for m in members:
            end = start + m.out_features
            m.weight = nn.Parameter(self.weight[start:end], requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(self.bias[start:end], requires_grad=m.bias.requires_grad)
            m.__class__ = _FusedLinear
            start = end
        self._hand_over_to(members)

    def _run(self, x: torch.Tensor, key) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _release_members(self) -> None:
        for m in self._members:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
            m.__class__ = nn.Linear
        super()._release_members()


def why_not_linear_fusable(members: list[nn.Module]) -> str | None:
    """None when these plain nn.Linear layers can share one F.linear, else what keeps them apart."""
    if any(type(m) is not nn.Linear for m in members):
        return "not all plain nn.Linear (or already fused)"
    first = members[0]
    for m in members[1:]:
        if m.in_features != first.in_features:
            return f"in_features differs ({first.in_features} vs {m.in_features})"
        if (m.weight.dtype, m.weight.device) != (first.weight.dtype, first.weight.device):
            return "weight dtype or device differs"
        if (m.bias is None) != (first.bias is None):
            return "bias differs in presence"
    return None


def fuse_linear_siblings(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """:func:`fuse_siblings` for plain nn.Linear siblings (a dense model's q/k/v and gate/up)."""
    return _fuse(model, groups, nn.Module, LinearGroup, why_not_linear_fusable)


def fused_groups(model: nn.Module) -> list[tuple[str, SiblingGroup]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SiblingGroup)]


def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings` / :func:`fuse_linear_siblings`: every member gets its own storage back;
    returns how many groups."""
    found = fused_groups(model)
    for name, group in found:
        group._release_members()
        parent_name, _, attr = name.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, attr)
    return len(found)


def refuse_fused(model: nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (save, cast) meets a fused model."""
    if fused_groups(model):
        raise LibOrthoError(f"{what} needs the model unfused: its sibling layers share buffers "
                            "(libortho.fuse_siblings); call libortho.unfuse_siblings(model) first")
    refuse_glu(model, what)
