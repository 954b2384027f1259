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
import types

import torch

NAME = "libortho_decode"
# what --attn takes: auto, transformers' SDPA, this module's attention, or that and the whole step's attention in one
# op (use_attention_step)
CHOICES = ("auto", "sdpa", "libortho", "libortho-step")


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


def use_attention_step(model, on: bool = True) -> int:
    """Run each decode step's attention layers as one op (``torch.ops.libortho.decode_attention_step``: the rotary
    embedding of q and k, the cache writes and the attention; ``libortho.ops.attention_step``) where the layer and the
    call allow it (step_takes), else the layer's own forward; ``on=False`` restores the layers' forwards. Needs
    ``use_decode_attention(model)`` (the masks it builds). Returns how many layers it changed."""
    n = 0
    for module in model.modules():
        if not on:
            if "forward" in vars(module) and getattr(module, "_libortho_step", False):
                del module.forward
                del module._libortho_step
                n += 1
        elif _step_layer(module) and not getattr(module, "_libortho_step", False):
            module.forward = types.MethodType(_step_forward, module)
            module._libortho_step = True
            n += 1
    return n


def _step_layer(module) -> bool:
    """A Llama-style attention layer: q/k/v/o projections, a layer index, no per-head norms of q and k."""
    return (all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))
            and not hasattr(module, "q_norm") and not hasattr(module, "k_norm")
            and type(module).__name__.endswith("Attention"))


def step_takes(module, hidden_states, cache, attention_mask, position_embeddings, kwargs) -> bool:
    """Whether the step op replaces ``module``'s forward for this call: one token per sequence, LibOrtho's attention
    in use, a shared-length static cache (``libortho.static_cache``; its length is the step's position) whose layer is
    filled already, a boolean (B|1, 1, 1, L) mask or a cache marked ``causal_only`` (its owner passes no padding mask,
    as StaticDecoder: the model's mask is then the causal one, which the op applies from the position, so the mask is
    not passed and a compiled step need not build it in every layer), no extras (attention sinks, soft-capping,
    dropout in training)."""
    if hidden_states.shape[1] != 1 or module.training or position_embeddings is None or cache is None:
        return False
    if getattr(module.config, "_attn_implementation", None) != NAME or getattr(cache, "length", None) is None:
        return False
    if any(kwargs.get(k) is not None for k in ("s_aux", "softcap", "position_bias")) or kwargs.get("output_attentions"):
        return False
    layers = getattr(cache, "layers", None)
    if not layers or module.layer_idx >= len(layers) or getattr(layers[module.layer_idx], "keys", None) is None:
        return False
    if getattr(cache, "causal_only", False):
        return True  # the mask is the causal one, which the op applies itself
    keys = layers[module.layer_idx].keys
    return (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1
            and attention_mask.shape[3] == keys.shape[2])


def _step_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                  cache=None, **kwargs):
    """The layer's forward for a decode step (the same projections, then one op), or its own forward otherwise."""
    c = cache if cache is not None else past_key_values
    if not step_takes(self, hidden_states, c, attention_mask, position_embeddings, kwargs):
        if cache is not None:
            kwargs["cache"] = cache
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    out = step_attention(self, self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states), c,
                         position_embeddings, attention_mask)
    return self.o_proj(out), None


def step_attention(module, q, k, v, cache, position_embeddings, attention_mask):
    """The step op for ``module`` (a layer step_takes took) on its projections q, k, v (B, 1, heads * head_dim):
    the attention output (B, 1, heads * head_dim), before o_proj."""
    b = q.shape[0]
    shape = (b, 1, -1, module.head_dim)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    layer = cache.layers[module.layer_idx]
    cos, sin = position_embeddings
    mask = None if getattr(cache, "causal_only", False) else attention_mask
    out = torch.ops.libortho.decode_attention_step(q, k, v, cos, sin, layer.keys, layer.values, cache.length, mask,
                                                   float(module.scaling))
    return out.reshape(b, 1, -1)


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
    """``--attn``'s value for ``model`` on ``device``: "auto" is "libortho-step" where the CUDA kernel takes the model's
    decode steps (measured faster than SDPA end to end on an H200, SmolLM2 and the 7B shape, and the step op faster
    than "libortho" in every row there), else "sdpa"."""
    if choice != "auto":
        return choice
    return "libortho-step" if kernel_fits(model, device) else "sdpa"


def use_decode_attention(model, on: bool = True) -> None:
    """Run ``model``'s decode steps through LibOrtho's decode attention (``on=False``: back to ``"sdpa"``)."""
    name = register() if on else "sdpa"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
