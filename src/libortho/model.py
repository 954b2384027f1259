"""Model surgery and control: decompose a causal LM, flip alpha, report sizes."""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import OrthoConfig
from .errors import LibOrthoError
from .fuse import refuse_fused
from .layer import OrthoLinear, check_alpha
from .split import split_linear
from .surgery import find_targets, linear_weight, set_module

META_ATTR = "libortho_meta"


def decompose(model: nn.Module, config: OrthoConfig, calib=None, reference: nn.Module | None = None,
              progress: bool = True, device=None) -> nn.Module:
    """Replace the target linears of ``model`` (in place) with OrthoLinear; returns the model.

    ``calib``: calibration windows (``libortho.calibration_data(...)``), needed by score="hessian"
    and method="gptq". ``reference``: the model before fine-tuning, for base_from="reference".
    ``device``: where the layer-by-layer calibration runs (default: the model's device).
    """
    if not isinstance(config, OrthoConfig):
        raise TypeError(f"config must be a libortho.OrthoConfig, got {type(config).__name__}")
    if any(isinstance(m, OrthoLinear) for m in model.modules()):
        raise LibOrthoError("this model is already decomposed (it holds OrthoLinear layers)")
    ref_weights = _reference_weights(model, reference, config)
    if config.needs_calibration:
        if calib is None:
            raise LibOrthoError(f"method={config.method!r} / score={config.score!r} needs calibration "
                                "data: decompose(model, config, calib=libortho.calibration_data(tok, text))")
        from .calibrate import decompose_layerwise
        decompose_layerwise(model, config, calib, ref_weights, progress=progress, device=device)
    else:
        targets = find_targets(model, config.targets)
        for name, lin in tqdm(targets, desc="decompose", disable=not progress):
            new = split_linear(linear_weight(lin), lin.bias, config, ref_weight=ref_weights.get(name))
            set_module(model, name, new.to(lin.weight.device))
    setattr(model, META_ATTR, {"config": config.to_dict(),
                               "calibration": getattr(calib, "description", None) if calib is not None else None,
                               "reference": None if reference is None else
                               getattr(getattr(reference, "config", None), "_name_or_path", "given")})
    return model


def _reference_weights(model, reference, config) -> dict:
    if config.base_from != "reference":
        if reference is not None:
            raise LibOrthoError("a reference model was given but config.base_from is 'self'; "
                                "use OrthoConfig(base_from='reference') for delta mode")
        return {}
    if reference is None:
        raise LibOrthoError("base_from='reference' needs the reference model: decompose(..., reference=ref)")
    if type(reference) is not type(model):
        raise LibOrthoError(f"reference is a {type(reference).__name__}, the model a {type(model).__name__}: "
                            "delta mode needs the same architecture")
    ref = dict(find_targets(reference, config.targets))
    out = {}
    for name, lin in find_targets(model, config.targets):
        if name not in ref:
            raise LibOrthoError(f"the reference model has no layer {name}")
        rw, w = linear_weight(ref[name]), linear_weight(lin)
        if rw.shape != w.shape:
            raise LibOrthoError(f"{name}: reference weight {tuple(rw.shape)} differs from the model's {tuple(w.shape)}")
        out[name] = rw
    return out


def ortho_layers(model: nn.Module, pattern: str | None = None) -> list[tuple[str, OrthoLinear]]:
    rx = re.compile(pattern) if pattern is not None else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, OrthoLinear) and (rx is None or rx.search(n))]


def set_alpha(model: nn.Module, value: float, pattern: str | None = None) -> int:
    """Set alpha of every OrthoLinear (or those whose name matches ``pattern``); returns how many."""
    value = check_alpha(value)
    layers = ortho_layers(model, pattern)
    if not layers:
        raise LibOrthoError(f"no OrthoLinear layers{'' if pattern is None else f' match {pattern!r}'}: "
                            "decompose the model first")
    for _, m in layers:
        m.alpha = value
    return len(layers)


@contextlib.contextmanager
def alpha(model: nn.Module, value: float, pattern: str | None = None):
    """``with libortho.alpha(model, 0.0): ...`` sets alpha and restores the previous values after."""
    saved = [(m, m.alpha) for _, m in ortho_layers(model, pattern)]
    set_alpha(model, value, pattern)
    try:
        yield model
    finally:
        for m, a in saved:
            m.alpha = a


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters and the OrthoLinear float buffers to ``dtype``; leave other buffers (e.g. rotary
    ``inv_freq``, which ``from_pretrained(dtype=...)`` keeps in fp32) as they are."""
    refuse_fused(model, "cast_model")
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, OrthoLinear):
            for key in ("scales", "zeros", "values", "bias"):
                t = getattr(m, key)
                if t is not None:
                    setattr(m, key, t.to(dtype))
    return model


def report(model: nn.Module) -> dict:
    """Per-layer and total stats of the decomposed linears (bits per weight include every array)."""
    rows, tot = [], {"params": 0, "ortho_nnz": 0, "bytes": 0, "base_bytes": 0, "ortho_bytes": 0}
    for name, m in ortho_layers(model):
        b = m.storage_bytes()
        numel = m.in_features * m.out_features
        stored = b["base"] + b["scales"] + b["zeros"] + b["ortho"]
        rows.append({"name": name, "out_features": m.out_features, "in_features": m.in_features,
                     "bits": m.bits, "group_size": m.group_size, "ortho_nnz": m.ortho_nnz,
                     "density": m.ortho_nnz / numel, "alpha": m.alpha, "bytes": stored,
                     "ortho_bytes": b["ortho"], "bits_per_weight": 8 * stored / numel})
        tot["params"] += numel
        tot["ortho_nnz"] += m.ortho_nnz
        tot["bytes"] += stored
        tot["base_bytes"] += b["base"] + b["scales"] + b["zeros"]
        tot["ortho_bytes"] += b["ortho"]
    if not rows:
        raise LibOrthoError("the model has no OrthoLinear layers: decompose it first")
    tot["density"] = tot["ortho_nnz"] / tot["params"]
    tot["bits_per_weight"] = 8 * tot["bytes"] / tot["params"]
    tot["base_bits_per_weight"] = 8 * tot["base_bytes"] / tot["params"]
    tot["dense_bf16_bytes"] = 2 * tot["params"]
    return {"layers": rows, "total": tot}


def format_report(rep: dict, max_rows: int = 8) -> str:
    lines = [f"{'layer':48s} {'shape':>12s} {'bits':>4s} {'nnz':>8s} {'density':>8s} {'bits/w':>7s}"]
    layers = rep["layers"]
    shown = layers if len(layers) <= max_rows else layers[: max_rows // 2] + [None] + layers[-max_rows // 2:]
    for r in shown:
        if r is None:
            lines.append(f"  ... {len(layers) - max_rows} more")
            continue
        lines.append(f"{r['name'][-48:]:48s} {r['out_features']:>5d}x{r['in_features']:<6d} {r['bits']:>4d} "
                     f"{r['ortho_nnz']:>8d} {100 * r['density']:>7.3f}% {r['bits_per_weight']:>7.3f}")
    t = rep["total"]
    lines.append(f"total: {t['params'] / 1e6:.2f} M weights in {len(layers)} layers, "
                 f"{t['bytes'] / 2**20:.2f} MiB ({t['dense_bf16_bytes'] / 2**20:.2f} MiB as bf16), "
                 f"ortho {t['ortho_nnz']} entries ({100 * t['density']:.3f} %), "
                 f"{t['bits_per_weight']:.3f} bits/weight (base alone {t['base_bits_per_weight']:.3f})")
    return "\n".join(lines)
