"""L2 prefetch chain: each packed launch asks L2 to fetch the next launch's weights as it finishes.

During decode the packed products stream their weights from HBM, and the small kernels between two of
them (norms, rotary, attention, activations) leave HBM mostly idle. :func:`chain_l2_prefetch` records the
order of a model's packed launches (one forward) and links each launch to the next (the last to the
first: decode repeats the forward). The CUDA decode kernel (v1) then requests a prefix of the next
launch's ``qweight`` and ``scales`` into L2 as its blocks finish, and its ortho arrays only while that
launch runs at alpha != 0: at alpha == 0 no ortho byte is fetched, as the kill switch promises.

A hint only: outputs are bit-identical with and without it (GPU tests), the reference backend ignores it,
and the other decode kernels (v2, v3) and the large-M path do not prefetch.
"""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_MAX_MB = 24.0  # about half of an H100/H200's L2 (50 MB): room for what the next kernel streams


def _launch_unit(layer: nn.Module) -> nn.Module:
    """What runs the product when ``layer`` is called: its fused group when all members share alpha."""
    g = layer._group
    if g is not None and all(m.alpha == layer.alpha for m in g._members):
        return g
    return layer


def launch_order(model: nn.Module, *args, **kwargs) -> list[nn.Module]:
    """The packed launches (OrthoLinears or fused groups) of one ``model(*args, **kwargs)``, in order."""
    from .layer import OrthoLinear  # layer.py imports next_buffers from here
    order: list[nn.Module] = []

    def hook(mod, _inputs):
        unit = _launch_unit(mod)
        if not order or order[-1] is not unit:
            order.append(unit)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, OrthoLinear)]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def chain_l2_prefetch(model: nn.Module, *args, max_mb: float = DEFAULT_MAX_MB, **kwargs) -> int:
    """Link each packed launch of ``model(*args, **kwargs)`` to the next; returns the number of links.

    ``max_mb`` caps what one launch requests (ortho arrays first, then the same leading share of the next
    launch's ``qweight`` and ``scales``). Run it after :func:`libortho.fuse_siblings` and set_alpha (a
    launch's unit depends on both); :func:`clear_l2_prefetch` undoes it."""
    if not max_mb > 0:
        raise ValueError(f"max_mb must be > 0, got {max_mb!r}")
    clear_l2_prefetch(model)
    order = launch_order(model, *args, **kwargs)
    if len(order) < 2:
        return 0
    for unit, nxt in zip(order, order[1:] + order[:1]):
        object.__setattr__(unit, "_l2_next", nxt)  # not a submodule: a plain reference
        object.__setattr__(unit, "_l2_bytes", int(max_mb * 2 ** 20))
    return len(order)


def clear_l2_prefetch(model: nn.Module) -> int:
    """Remove every link :func:`chain_l2_prefetch` made; returns how many."""
    n = 0
    for m in model.modules():
        if "_l2_next" in m.__dict__:
            del m.__dict__["_l2_next"], m.__dict__["_l2_bytes"]
            n += 1
    return n


def _runs_ortho(unit: nn.Module) -> bool:
    """True when the unit's launch reads its ortho arrays (alpha != 0 for every member, entries present)."""
    members = getattr(unit, "_members", None) or [unit]
    return unit.values.numel() > 0 and all(m.alpha != 0 for m in members)


def _leading(t: torch.Tensor, frac: float) -> torch.Tensor:
    """The first ``frac`` of ``t``'s rows (dim 0: row tiles of the packed layout), flattened."""
    rows = t.shape[0] if frac >= 1 else int(t.shape[0] * frac)
    return t[:rows].reshape(-1)


def next_buffers(layer: nn.Module) -> tuple:
    """(qweight, scales, col_idx, values) prefixes of the launch after ``layer`` to prefetch, or Nones."""
    nxt = layer.__dict__.get("_l2_next")
    if nxt is None:
        return (None,) * 4
    budget = layer.__dict__["_l2_bytes"]
    col = val = None
    if _runs_ortho(nxt):
        per = nxt.col_idx.element_size() + nxt.values.element_size()
        n = min(nxt.values.numel(), budget // per)
        col, val = nxt.col_idx[:n], nxt.values[:n]
        budget -= n * per
    base = nxt.qweight.numel() * 4 + nxt.scales.numel() * nxt.scales.element_size()
    frac = min(1.0, budget / base)
    return _leading(nxt.qweight, frac), _leading(nxt.scales, frac), col, val
