"""Calibration data and the layer-by-layer driver for Hugging Face causal LMs.

The driver captures the inputs of decoder block 0, then for each block i: accumulates
``H = 2 X^T X / n`` of every target linear with forward hooks, decomposes the block's linears, and
runs the *decomposed* block to produce the inputs of block i+1 (later layers see what the deployed
model will see). Only the current block and the activations live on the compute device; the rest of
the model may stay on the CPU, so a model larger than GPU memory can be decomposed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import OrthoConfig
from .data import read_text, token_windows, tokenize
from .errors import LibOrthoError
from .split import split_linear
from .surgery import decoder_blocks, find_targets, linear_weight, set_module


@dataclass
class Calibration:
    """Calibration windows (n, seq_len) and a description written into every save and result."""
    input_ids: torch.Tensor
    description: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def calibration_data(tokenizer, text, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                     name: str | None = None) -> Calibration:
    """``n_samples`` windows of ``seq_len`` tokens drawn (seeded) from ``text``.

    ``text``: raw text, a path or a list of paths, or ``"hf:<dataset>[:<config>]"`` (a Hugging Face
    dataset's train split, when online and the ``datasets`` package is installed).
    """
    source = name
    if isinstance(text, (list, tuple, os.PathLike)) or _is_file(text):
        paths = list(text) if isinstance(text, (list, tuple)) else [text]
        source = source or "+".join(Path(p).name for p in paths)
        text = read_text(paths)
    elif isinstance(text, str) and text.startswith("hf:"):
        source = source or text
        text = _hf_text(text[3:])
    elif _looks_like_path(text):  # no such file: read as text it would fail as "has 14 tokens, fewer than one window"
        raise LibOrthoError(f"calibration text {text!r} looks like a file path, but no such file exists; pass an "
                            "existing path (str or Path), a list of paths, raw text, or 'hf:<dataset>'")
    ids = tokenize(tokenizer, text)
    windows = token_windows(ids, seq_len, n_samples, seed)
    return Calibration(windows, f"{n_samples} x {seq_len} tokens of {source or 'given text'} (seed {seed})")


def _is_file(text) -> bool:
    """A string that names an existing file (raw text is never mistaken for a path)."""
    if not isinstance(text, str) or "\n" in text or len(text) > 1024:
        return False
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a long line of text: not a usable file name
        return False


def _looks_like_path(text) -> bool:
    """One word with a folder separator or a file suffix (``data/emma.txt``, ``emma.txt``): a path (one word of
    calibration text could never fill a window anyway)."""
    if not isinstance(text, str) or not text or any(c.isspace() for c in text):
        return False
    return "/" in text or os.sep in text or Path(text).suffix[1:].isalnum()


def _hf_text(spec: str) -> str:
    try:
        import datasets
    except ImportError:
        raise LibOrthoError("calibration from a Hugging Face dataset needs `pip install datasets`") from None
    name, _, cfg = spec.partition(":")
    ds = datasets.load_dataset(name, cfg or None, split="train")
    return "\n\n".join(ds["text"])


def as_calibration(calib) -> Calibration:
    if isinstance(calib, Calibration):
        return calib
    if isinstance(calib, torch.Tensor) and calib.dim() == 2 and not calib.is_floating_point():
        return Calibration(calib, f"{calib.shape[0]} x {calib.shape[1]} given token windows")
    raise TypeError("calib must be libortho.calibration_data(...) or an int tensor (n, seq_len) of token ids")


class _Stop(Exception):
    """Raised by the capture hook: block 0's inputs are recorded, the rest of the forward is not needed."""


def _move_outside_blocks(model: nn.Module, prefix: str, device) -> None:
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for key, p in list(mod.named_parameters(recurse=False)):
            p.data = p.data.to(device)
        for key, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                mod._buffers[key] = b.to(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_block_inputs(model, blocks, input_ids, batch_size, device):
    """Hidden states entering block 0, and the keyword arguments the model passes to blocks."""
    captured = []

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_value", "past_key_values")}
        captured.append((hs, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i:i + batch_size].to(device), use_cache=False)
            except _Stop:  # the hook captured this batch's block-0 inputs and cut the forward short
                continue
    finally:
        handle.remove()
    return captured


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def decompose_layerwise(model: nn.Module, config: OrthoConfig, calib, ref_weights: dict,
                        progress: bool = True, device=None, batch_size: int = 8) -> None:
    calib = as_calibration(calib)
    home = _model_device(model)
    device = torch.device(device) if device is not None else home
    prefix, blocks = decoder_blocks(model)
    targets = find_targets(model, config.targets)
    outside = [n for n, _ in targets if not n.startswith(prefix + ".")]
    if outside:
        raise LibOrthoError(f"calibrated decomposition covers the linears inside the decoder blocks; "
                            f"{outside[:3]} lie outside ({prefix}): narrow the targets pattern")
    was_training = model.training
    model.eval()
    _move_outside_blocks(model, prefix, device)
    blocks[0].to(device)
    try:
        states = capture_block_inputs(model, blocks, calib.input_ids, batch_size, device)
    finally:
        blocks[0].to(home)
        _move_outside_blocks(model, prefix, home)
    bar = tqdm(total=len(targets), desc="decompose (calibrated)", disable=not progress)
    for i, block in enumerate(blocks):
        names = [(n, m) for n, m in targets if n.startswith(f"{prefix}.{i}.")]
        block.to(device)
        hessians = _collect_hessians(block, names, states)
        for name, lin in names:
            new = split_linear(linear_weight(lin), lin.bias, config, hessian=hessians.pop(name),
                               ref_weight=ref_weights.get(name), device=device)
            set_module(model, name, new.to(device))
            bar.update(1)
        states = [(_block_output(block(hs, **kw)), kw) for hs, kw in states]
        block.to(home)
    bar.close()
    model.train(was_training)


def _collect_hessians(block, names, states) -> dict:
    """H = 2 X^T X / n for every target of the block; linears fed the same tensor share one H
    (q/k/v, gate/up), found on the first batch by tensor identity."""
    acc = {n: [None, 0] for n, _ in names}
    alias: dict[str, str] = {}
    first = {"batch": True, "seen": {}}

    def make_hook(name):
        def hook(module, args, output):
            x = args[0]
            if first["batch"]:  # hold x so its id cannot be reused by another tensor in this batch
                owner, _ = first["seen"].setdefault(id(x), (name, x))
                if owner != name:
                    alias[name] = owner
            if name in alias:
                return
            x = x.detach().reshape(-1, x.shape[-1]).float()
            H, count = acc[name]
            total = count + x.shape[0]
            H = torch.zeros(x.shape[1], x.shape[1], device=x.device) if H is None else H * (count / total)
            x = x * (2.0 / total) ** 0.5
            acc[name] = [H.addmm_(x.t(), x), total]
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in names]
    try:
        for hs, kw in states:
            block(hs, **kw)
            first["batch"], first["seen"] = False, {}
    finally:
        for h in handles:
            h.remove()
    return {n: acc[alias.get(n, n)][0] for n, _ in names}
