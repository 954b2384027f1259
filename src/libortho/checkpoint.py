"""Save and load decomposed models: safetensors + a versioned JSON manifest + the HF config.

Layout of a save directory::

    libortho.json       manifest (format, version, OrthoConfig, per-layer shapes/dtypes/alpha, checksums)
    model.safetensors   every tensor of the model (OrthoLinear buffers included), no pickle
    config.json         the Hugging Face config (plus generation_config.json, tokenizer files)

Writes go to a temporary sibling directory that replaces the target only once complete, so a
failed save never leaves a half-written directory in place of a good one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model
from torch import nn

from .compat import from_config
from .errors import SaveFormatError
from .fuse import refuse_fused
from .layer import OrthoLinear
from .model import META_ATTR, ortho_layers
from .sieve import check_csr
from .surgery import set_module

FORMAT = "libortho"
FORMAT_VERSION = 1
MANIFEST = "libortho.json"
WEIGHTS = "model.safetensors"
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.int16, torch.int32)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _layer_entry(name: str, m: OrthoLinear) -> dict:
    return {"name": name, "in_features": m.in_features, "out_features": m.out_features,
            "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
            "ortho_nnz": m.ortho_nnz, "alpha": m.alpha, "scale_dtype": str(m.scales.dtype),
            "value_dtype": str(m.values.dtype), "col_dtype": str(m.col_idx.dtype),
            "bias_dtype": None if m.bias is None else str(m.bias.dtype)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(model: nn.Module, directory, tokenizer=None) -> Path:
    """Write a decomposed model to ``directory`` atomically; an existing save there is replaced."""
    from . import __version__
    refuse_fused(model, "libortho.save")
    layers = ortho_layers(model)
    if not layers:
        raise SaveFormatError("the model has no OrthoLinear layers: decompose it before libortho.save")
    target = Path(directory).resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).exists())):
        raise SaveFormatError(f"{target} exists and is not a LibOrtho save; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _st_save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = getattr(model, META_ATTR, {}) or {}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "libortho_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model_class": type(model).__name__, "dtype": str(_model_dtype(model)),
            "config": meta.get("config"), "calibration": meta.get("calibration"),
            "reference": meta.get("reference"),
            "layers": [_layer_entry(n, m) for n, m in layers],
            "files": {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": _sha256(tmp / WEIGHTS)}},
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _model_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.dtype if emb is not None else next(model.parameters()).dtype


def read_manifest(directory) -> dict:
    """Validate a save directory and return its manifest (SaveFormatError says what is wrong)."""
    d = Path(directory)
    if not d.is_dir():
        raise SaveFormatError(f"{d} is not a directory; expected a LibOrtho save directory")
    path = d / MANIFEST
    if not path.exists():
        raise SaveFormatError(f"{d} is not a LibOrtho save: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaveFormatError(f"{path} is corrupted (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SaveFormatError(f"{path} is not a LibOrtho manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SaveFormatError(f"{d} has format version {version!r}; this LibOrtho reads version {FORMAT_VERSION}")
    for name, info in manifest.get("files", {}).items():
        f = d / name
        if not f.exists():
            raise SaveFormatError(f"{d} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise SaveFormatError(f"{f} is truncated or altered: {size} bytes, the manifest says {info['bytes']}")
        if _sha256(f) != info["sha256"]:
            raise SaveFormatError(f"{f} is corrupted: its checksum does not match the manifest")
    return manifest


def load(directory, device=None) -> nn.Module:
    """Load a model saved by :func:`save`; it generates exactly as the saved one did."""
    from transformers import AutoConfig
    from .config import OrthoConfig
    d = Path(directory)
    manifest = read_manifest(d)
    hf_config = AutoConfig.from_pretrained(d)
    dtype = _DTYPES.get(manifest.get("dtype"), torch.float32)
    model = from_config(hf_config, dtype)
    for entry in manifest["layers"]:
        shell = OrthoLinear(entry["in_features"], entry["out_features"], entry["bits"], entry["group_size"],
                            entry["symmetric"], entry["ortho_nnz"], entry["bias_dtype"] is not None,
                            dtype=_DTYPES[entry["scale_dtype"]], value_dtype=_DTYPES[entry["value_dtype"]],
                            bias_dtype=_DTYPES.get(entry["bias_dtype"]))
        if str(shell.col_idx.dtype) != entry["col_dtype"]:
            raise SaveFormatError(f"{entry['name']}: column index dtype {entry['col_dtype']} does not fit "
                                  f"in_features={entry['in_features']}")
        try:
            set_module(model, entry["name"], shell)
        except AttributeError:
            raise SaveFormatError(f"{d}: layer {entry['name']} does not exist in a {type(model).__name__}") from None
        shell.alpha = entry["alpha"]
    try:
        missing, unexpected = _st_load_model(model, str(d / WEIGHTS), strict=False)
    except Exception as e:  # safetensors raises several types for damaged files
        raise SaveFormatError(f"{d / WEIGHTS} cannot be read: {e}") from None
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SaveFormatError(f"{d / WEIGHTS} does not match the manifest: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, layer in ortho_layers(model):
        try:
            check_csr(layer.ortho())
        except ValueError as e:
            raise SaveFormatError(f"{d / WEIGHTS}: layer {name}: {e}") from None
    if manifest.get("config"):
        setattr(model, META_ATTR, {"config": OrthoConfig.from_dict(manifest["config"]).to_dict(),
                                   "calibration": manifest.get("calibration"),
                                   "reference": manifest.get("reference")})
    model.eval()
    return model.to(device) if device is not None else model


def _tied_names(model: nn.Module) -> set[str]:
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {n for group in names.values() if len(group) > 1 for n in group}
