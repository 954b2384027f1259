"""Finding the linears of a causal LM and swapping modules in place."""
from __future__ import annotations

import re

import torch
from torch import nn

from .errors import LibOrthoError


def _is_conv1d(m: nn.Module) -> bool:  # GPT-2's transposed linear (transformers.pytorch_utils.Conv1D)
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """Weight as (out_features, in_features), detached."""
    w = m.weight.detach()
    return w.t() if _is_conv1d(m) else w


def num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, key, None)
        if isinstance(n, int):
            return n
    raise LibOrthoError("cannot tell the number of decoder layers: the model has no config with "
                        "num_hidden_layers / n_layer")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (model.layers, transformer.h, model.decoder.layers, ...)."""
    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise LibOrthoError(f"no list of {n} decoder blocks found in {type(model).__name__}")
    return min(found, key=lambda item: item[0].count("."))


def tied_weight_ids(model: nn.Module) -> set[int]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {id(emb.weight)} if emb is not None else set()


def find_targets(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """Target linears: default every linear inside the decoder blocks; else those whose name matches."""
    tied = tied_weight_ids(model)
    if pattern is None:
        prefix, blocks = decoder_blocks(model)
        found = [(f"{prefix}.{name}", m) for name, m in blocks.named_modules() if is_linear(m)]
    else:
        rx = re.compile(pattern)
        found = [(name, m) for name, m in model.named_modules() if is_linear(m) and rx.search(name)]
        for name, m in found:
            if id(m.weight) in tied:
                raise LibOrthoError(f"{name} shares its weight with the input embedding (tied); "
                                    "LibOrtho never decomposes a tied lm_head: narrow the targets pattern")
    if not found:
        raise LibOrthoError(f"no target linears found (targets={pattern!r})")
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
