"""The attention of a decode step in one op: ``torch.ops.libortho.decode_attention_step``.

What transformers' attention layer does between the projections and ``o_proj`` at one token per sequence, with a
static cache: the rotary embedding of q and of the new key (``x cos + rotate_half(x) sin``), the new key and value
rows written into the caches at the step's position, then ``decode_attention`` (``ops/attention.py``) over the caches.
As separate kernels that is three launches a layer besides the attention (q's rotary, k's rotary and its cache write,
the value's cache write); ``decode_attention.cu`` does all of it in the attention's own launch.

q (B, Hq, 1, D), k_new and v_new (B, Hkv, 1, D): the projections of the step, before the rotary embedding; cos and
sin (B or 1, 1, D) as transformers' rotary module gives them; k_cache and v_cache (B, Hkv, L, D), written at ``pos`` (a
one-element int64 tensor on the device, the same position for every sequence); mask and scale as ``decode_attention``,
except that positions past ``pos`` are never attended (causal at the step: a static cache's later rows hold no keys
yet), so ``mask=None`` means exactly the causal mask. Returns (B, 1, Hq, D). The rotary embedding is computed in float32 and rounded to the activation dtype once, as
inductor computes the compiled model's rotary kernels (transformers' eager code rounds after each multiply).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cuda
from .attention import attention_chunk, check_attention_inputs, decode_attention_reference, kernel_takes


def check_step_inputs(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale) -> None:
    """Clear errors for what a caller can get wrong, on top of decode_attention's checks (no synchronization)."""
    check_attention_inputs(q, k_cache, v_cache, mask, scale)
    b, _, _, d = q.shape
    want = (b, k_cache.shape[1], 1, d)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (B, Hkv, 1, D) = {want}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; expected q's {q.dtype} on {q.device}")
    if d % 2:
        raise ValueError(f"the rotary embedding needs an even head dim, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or tuple(t.shape[1:]) != (1, d) or t.shape != cos.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (B or 1, 1, D) = ({b} or 1, 1, {d}), "
                             "cos and sin alike")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; expected q's {q.dtype} on {q.device}")
    if pos.dtype != torch.long or pos.numel() != 1 or pos.device != q.device:
        raise ValueError(f"pos must be one int64 element on {q.device}, got {pos.dtype} {tuple(pos.shape)} on "
                         f"{pos.device}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, 1, D) rotated: x cos + rotate_half(x) sin in float32, rounded once to x's dtype."""
    xf = x.float()
    half = x.shape[-1] // 2
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.float()[:, None] + rot * sin.float()[:, None]).to(x.dtype)


@torch.library.custom_op("libortho::decode_attention_step", mutates_args=("k_cache", "v_cache"))
def decode_attention_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                          mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Rotates q and k_new, writes k_new (rotated) and v_new at cache position pos, attends; (B, 1, Hq, D)."""
    check_step_inputs(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale)
    return step_reference(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale)


def step_reference(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale):
    """The op in PyTorch: the cache writes by index_copy_, the attention by the float32 reference."""
    at = pos.reshape(1)
    k_cache.index_copy_(2, at, rope(k_new, cos, sin))
    v_cache.index_copy_(2, at, v_new)
    causal = (torch.arange(k_cache.shape[2], device=q.device) <= at).view(1, 1, 1, -1)
    if mask is None:
        mask = causal
    elif mask.dtype == torch.bool:
        mask = mask & causal
    else:
        mask = mask.masked_fill(~causal, float("-inf"))
    return decode_attention_reference(rope(q, cos, sin), k_cache, v_cache, mask, scale)


@decode_attention_step.register_fake
def _(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


def _row_aligned(t: torch.Tensor) -> bool:
    """Last dimension contiguous, rows at 16-byte steps (what decode_attention.cu loads)."""
    step = 16 // t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        t.shape[i] == 1 or t.stride(i) % step == 0 for i in range(t.dim() - 1))


def decode_attention_step_cuda(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale):
    check_step_inputs(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale)
    takes = (cuda.available() and kernel_takes(q, k_cache, v_cache)
             and all(_row_aligned(t) for t in (k_new, v_new, cos, sin)) and cos.stride(0) == sin.stride(0))
    if not takes:  # the reference backend asked for, or a call the kernel does not take (it says so once)
        if cuda.available():
            cuda._warn_once(f"attention-step-{q.dtype}-{q.shape[3]}", "libortho: no CUDA decode-attention-step kernel "
                            f"for this call (dtype {q.dtype}, head dim {q.shape[3]}, layout); using the reference")
        return step_reference(q, k_new, v_new, cos, sin, k_cache, v_cache, pos, mask, scale)
    chunk = attention_chunk(q.shape[0], k_cache.shape[1], k_cache.shape[2], cuda._sms(q.device))
    out = cuda.extension().decode_attention_step(q, k_new, v_new, cos, sin, k_cache, v_cache, pos.reshape(1), mask,
                                                 float(scale), chunk, True, cuda.pdl_mode(q.shape[0]))
    return cuda._checked(out, "decode attention step")


decode_attention_step.register_kernel("cuda")(decode_attention_step_cuda)
