"""LibOrtho's decode attention inside transformers' models: ``use_decode_attention(model)``.

Registers an attention implementation, ``"libortho_decode"``, with transformers (its attention function and, for the
masks, SDPA's mask function, so the model builds the same boolean masks it builds for ``"sdpa"``). A call with one
query token per sequence (a decode step) runs ``torch.ops.libortho.decode_attention`` (``libortho.ops.attention``);
every other call (prefill, dropout, attention sinks, soft-capping, position biases) runs transformers' own SDPA
function unchanged. On CUDA the op reads only the blocks of cache positions the mask lets through, where SDPA reads
the whole static cache.
"""
from __future__ import annotations

import math

import torch

NAME = "libortho_decode"
CHOICES = ("auto", "sdpa", "libortho")  # what --attn takes: auto, transformers' SDPA, or this module's attention


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function signature: query (B, Hq, q, D), key / value (B, Hkv, L, D); returns
    ((B, q, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    special = any(kwargs.get(k) is not None for k in ("s_aux", "softcap", "position_bias"))
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[2] == 1
                                         and attention_mask.shape[3] == key.shape[2])
    if query.shape[2] != 1 or dropout != 0.0 or special or not mask_ok or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return _decode_attention(query, key, value, attention_mask, float(scale)), None


def _decode_attention(q, k, v, mask, scale):
    """The op call, a seam of its own so that tests can count the calls that reach it."""
    return torch.ops.libortho.decode_attention(q, k, v, mask, scale)


def register() -> str:
    """Make ``"libortho_decode"`` a transformers attention implementation (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def kernel_fits(model, device) -> bool:
    """Whether decode_attention.cu takes ``model``'s decode steps on ``device`` (else the op would run its float32
    reference): CUDA and what the kernel is built for (``libortho.ops.attention.kernel_takes_shape``)."""
    from .ops.attention import kernel_takes_shape
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    groups = heads // (getattr(cfg, "num_key_value_heads", None) or heads)
    return torch.device(device).type == "cuda" and kernel_takes_shape(next(model.parameters()).dtype, head_dim, groups)


def resolve(choice: str, model, device) -> str:
    """``--attn``'s value for ``model`` on ``device``: "auto" is "libortho" where the CUDA kernel takes the model's
    decode steps (measured faster than SDPA end to end on an H200, SmolLM2 and the 7B shape), else "sdpa"."""
    if choice != "auto":
        return choice
    return "libortho" if kernel_fits(model, device) else "sdpa"


def use_decode_attention(model, on: bool = True) -> None:
    """Run ``model``'s decode steps through LibOrtho's decode attention (``on=False``: back to ``"sdpa"``)."""
    name = register() if on else "sdpa"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
