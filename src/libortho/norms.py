"""A decoder layer's RMSNorms and residual adds done by its products, in the one-token decode steps.

At batch 1 the compiled step of a Llama-style layer runs, besides its four products and its attention, two small
kernels (residual add + RMSNorm, before the attention and before the MLP) that cost a few microseconds each whatever
their size. :func:`fuse_norms` moves their work into the products' epilogues: the norm's per-row scale r = 1 / RMS(h)
commutes with the product, W (g * h) r = r W (g * h), so

* a residual-adding product (o_proj, down_proj) writes h = residual + y, g * h for the next norm's weight g, and the
  sums of squares of h per 16 features (``libortho::ortho_linear_add_norm``);
* the next product (q/k/v as one group, the GLU layer) reads g * h and scales its sums by r, computed from those
  partial sums (``libortho::ortho_linear_rms``, ``libortho::ortho_glu_rms``).

Between layers the step carries ``(h, g * h, part)`` instead of h; the model's final norm is applied to h as before.
Rounding: the norm's output is not rounded to the activation dtype before the product (r is applied to the fp32
sums), so the logits agree with the unfused model's to the bf16 level, not bit for bit. Calls the step op does not
take (the prompt, a sliding-window layer) run the layer's own forward on h.

Needs, per layer: the attention step op (:func:`libortho.attention.use_attention_step`), q/k/v fused as siblings with
one alpha, the MLP as a GLU layer (:func:`libortho.fuse_glu`), a decomposed o_proj and down_proj, and norms that
compute transformers' plain RMSNorm (checked on a sample).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from . import quant
from .attention import step_attention, step_takes
from .fuse import OrthoGroup
from .glu import OrthoGLU
from .layer import OrthoLinear
from .ops import check_inputs
from .ops.reference import NORM_TILE, norm_carry

_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


def _args(layer, x: torch.Tensor, alpha: float):
    check_inputs(x, layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias,
                 alpha, layer.bits, layer.out_features, layer.in_features)
    return (layer.qweight, layer.scales, layer.zeros, layer.row_ptr, layer.col_idx, layer.values, layer.bias, alpha,
            layer.bits, quant.effective_group_size(layer.group_size, layer.in_features), layer.out_features,
            layer.in_features)


def _check(x: torch.Tensor, t: torch.Tensor, cols: int, dtype: torch.dtype, what: str) -> None:
    rows = x.numel() // x.shape[-1]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != x.device:
        raise ValueError(f"{what} must be a {dtype} tensor on {x.device}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '-')}")
    if t.shape[-1] != cols or t.numel() != rows * cols:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected {rows} rows of {cols} for x of shape "
                         f"{tuple(x.shape)}")


def add_norm(layer: OrthoLinear, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """``(h, g * h, part)`` of ``layer(x) + residual`` and the norm weight g (libortho::ortho_linear_add_norm)."""
    n = layer.out_features
    if n % NORM_TILE:
        raise ValueError(f"out_features {n} is not a multiple of {NORM_TILE}: no sums of squares per {NORM_TILE}")
    _check(x, residual, n, x.dtype, "residual")
    if weight.shape != (n,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"the norm weight must be ({n},) {x.dtype} on {x.device}, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    hg, part = torch.ops.libortho.ortho_linear_add_norm(x, *_args(layer, x, layer.alpha), residual, weight)
    return hg[0], hg[1], part


def rms_product(layer, x: torch.Tensor, part: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    """``layer`` (an OrthoLinear, a fused group or an OrthoGLU) applied to x = g * h normalized by h's RMS."""
    if layer.in_features % NORM_TILE:
        raise ValueError(f"in_features {layer.in_features} is not a multiple of {NORM_TILE}")
    _check(x, part, layer.in_features // NORM_TILE, torch.float32, "part (the sums of squares)")
    op = torch.ops.libortho.ortho_glu_rms if isinstance(layer, OrthoGLU) else torch.ops.libortho.ortho_linear_rms
    return op(x, *_args(layer, x, alpha), part, eps)


# (h, g * h, part) of a plain hidden state (the embeddings, or a layer's own forward's output)
carry = norm_carry


def _plain_rmsnorm(norm: nn.Module) -> bool:
    """Whether ``norm`` computes transformers' plain RMSNorm (weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)) and
    nothing else, checked on a sample."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    x = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    xf = x.float()
    want = weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    with torch.no_grad():
        return torch.equal(norm(x), want)


def why_not_norms(layer: nn.Module, next_norm: nn.Module | None) -> str | None:
    """None when :func:`fuse_norms` can take ``layer`` (whose hidden state the norm ``next_norm`` reads next)."""
    if type(layer).__name__ not in _LAYERS:
        return f"{type(layer).__name__} is not one of {', '.join(_LAYERS)}"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if not getattr(attn, "_libortho_step", False):
        return "its attention does not run the step op (libortho.attention.use_attention_step)"
    q, k, v = (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj"))
    group = getattr(q, "_group", None)
    if not isinstance(group, OrthoGroup) or group._members != [q, k, v] or not q.alpha == k.alpha == v.alpha:
        return "q/k/v are not one fused group with one alpha (libortho.fuse_siblings)"
    if not isinstance(getattr(mlp, "glu_proj", None), OrthoGLU) or not isinstance(getattr(mlp, "down_proj", None),
                                                                                    OrthoLinear):
        return "its MLP is not a GLU layer with a decomposed down_proj (libortho.fuse_glu)"
    if not isinstance(attn.o_proj, OrthoLinear) or attn.o_proj._group is not None:
        return "o_proj is not a decomposed layer of its own"
    norms = (layer.input_layernorm, layer.post_attention_layernorm, next_norm)
    if next_norm is None or not all(_plain_rmsnorm(n) for n in norms):
        return "a norm is not transformers' plain RMSNorm"
    if any(n.weight.numel() % NORM_TILE for n in norms):
        return f"hidden size is not a multiple of {NORM_TILE}"
    return None


def _fused_forward(self, hidden_states, *args, **kwargs):
    """The layer's decode step with the norms in its products (module docstring), or its own forward on h."""
    carried = isinstance(hidden_states, tuple)
    h = hidden_states[0] if carried else hidden_states
    attn, mlp = self.self_attn, self.mlp
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    extras = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "attention_mask",
                                                             "position_embeddings", "position_ids", "use_cache")}
    if args or not step_takes(attn, h, cache, kwargs.get("attention_mask"), kwargs.get("position_embeddings"), extras):
        return type(self).forward(self, h, *args, **kwargs)
    _, gh, part = hidden_states if carried else carry(h, self.input_layernorm.weight)
    group = attn.q_proj._group
    qkv = rms_product(group, gh, part, self.input_layernorm.variance_epsilon, attn.q_proj.alpha)
    out = step_attention(attn, *torch.split(qkv, group.sizes, dim=-1), cache, kwargs["position_embeddings"],
                         kwargs.get("attention_mask"))
    h1, gh1, part1 = add_norm(attn.o_proj, out, h, self.post_attention_layernorm.weight)
    act = rms_product(mlp.glu_proj, gh1, part1, self.post_attention_layernorm.variance_epsilon, mlp.glu_proj.alpha)
    return add_norm(mlp.down_proj, act, h1, self._libortho_next_norm.weight)


def _final_norm_forward(self, hidden_states):
    """The model's last norm, on h when the layers carried (h, g * h, part)."""
    h = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
    return type(self).forward(self, h)


def _decoder_layers(model: nn.Module):
    """(layers, final norm) of a transformers causal LM with ``model.model.layers`` and ``model.model.norm``."""
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None), getattr(inner, "norm", None)


def fuse_norms(model: nn.Module) -> list[int]:
    """Run the RMSNorms and residual adds of every decoder layer in its products' epilogues during the decode steps,
    when every layer allows it (:func:`why_not_norms`: a layer left as it is could not read what a fused one hands
    on); returns the layers' indices, or [] with nothing changed. A run-time change like :func:`libortho.fuse_glu`:
    :func:`unfuse_norms` undoes it."""
    layers, final = _decoder_layers(model)
    if not layers or final is None or any(hasattr(layer, "_libortho_next_norm") for layer in layers):
        return []
    nexts = [layers[i + 1].input_layernorm if i + 1 < len(layers) else final for i in range(len(layers))]
    if any(why_not_norms(layer, nxt) is not None for layer, nxt in zip(layers, nexts)):
        return []
    for layer, nxt in zip(layers, nexts):
        object.__setattr__(layer, "_libortho_next_norm", nxt)  # not a submodule: no second registration
        layer.forward = types.MethodType(_fused_forward, layer)
    final.forward = types.MethodType(_final_norm_forward, final)
    return list(range(len(layers)))


def unfuse_norms(model: nn.Module) -> int:
    """Undo :func:`fuse_norms`; returns how many layers it restored."""
    layers, final = _decoder_layers(model)
    n = 0
    for layer in layers or []:
        if "forward" in vars(layer) and hasattr(layer, "_libortho_next_norm"):
            del layer.forward
            object.__delattr__(layer, "_libortho_next_norm")
            n += 1
    if n and final is not None and "forward" in vars(final):
        del final.forward
    return n
