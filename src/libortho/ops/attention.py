"""Attention of one query token against a KV cache (a decode step): ``torch.ops.libortho.decode_attention``.

q (B, Hq, 1, D); k and v (B, Hkv, L, D), Hq a multiple of Hkv (grouped-query attention), e.g. a static cache whose
positions past the filled ones the mask excludes; mask None, or (B or 1, Hq or 1, 1, L), boolean (True attends) or
additive; out (B, 1, Hq, D): the layout transformers' attention functions return. The semantics of torch's
``scaled_dot_product_attention`` with one query: ``softmax(scale * q k^T + mask) v``, zeros where the mask excludes
every position (as SDPA gives since torch 2.5).

The default implementation is a float32 reference; on CUDA, ``decode_attention.cu`` splits the cache's positions
over blocks and combines their partial softmaxes, and reads no K or V for a block of positions the mask excludes
(SDPA reads the whole cache). ``libortho.attention`` plugs it into transformers' models.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import cuda

MASK_DTYPES = (torch.bool, torch.float32, torch.bfloat16, torch.float16)


def check_attention_inputs(q, k, v, mask, scale) -> None:
    """Clear errors for what a caller can get wrong; cheap (no device synchronization)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dimensions")
    b, hq, one, d = q.shape
    if one != 1:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected (B, Hq, 1, D): one query token per sequence")
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={b}, Hkv, L, D={d})")
    if k.shape[2] == 0 or k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"q's {hq} heads must be a multiple of the cache's {k.shape[1]} heads, with L >= 1 positions")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if mask is not None:
        ok = (mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] in (1, hq) and mask.shape[2] == 1
              and mask.shape[3] == k.shape[2])
        if not ok:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (B or 1, Hq or 1, 1, L={k.shape[2]})")
        if mask.dtype not in MASK_DTYPES:
            raise TypeError(f"mask must be boolean or float32 / bfloat16 / float16, got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device}, q on {q.device}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be positive and finite, got {scale!r}")


def decode_attention_reference(q, k, v, mask, scale) -> torch.Tensor:
    """Float32 math: softmax(scale * q k^T + mask) v, (B, 1, Hq, D) in q's dtype."""
    groups = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale  # (B, Hq, 1, L)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isneginf(s).all(dim=-1, keepdim=True), 0.0, p)  # nothing attends: zeros, as SDPA
    return (p @ vf).transpose(1, 2).to(q.dtype)


@torch.library.custom_op("libortho::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v for one query token per sequence; (B, 1, Hq, D)."""
    check_attention_inputs(q, k, v, mask, scale)
    return decode_attention_reference(q, k, v, mask, scale)


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


def kernel_takes_shape(dtype: torch.dtype, head_dim: int, groups: int) -> bool:
    """What decode_attention.cu is built for: fp16 / bf16, head dim 64 or 128, at most 8 query heads per cache head."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128) and groups <= 8


def kernel_takes(q, k, v) -> bool:
    """Whether decode_attention.cu runs this call (else the reference does): a dtype, head dim and grouping it is built
    for (kernel_takes_shape), last dimensions contiguous and rows at 16-byte steps."""
    if not kernel_takes_shape(q.dtype, q.shape[3], q.shape[1] // k.shape[1]):
        return False
    step = 16 // q.element_size()
    for t in (q, k, v):
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(t.shape[i] > 1 and t.stride(i) % step for i in range(3)):
            return False
    return True


def attention_chunk(batch: int, kv_heads: int, length: int, sms: int) -> int:
    """Cache positions per block: 64, halved (down to 16) while the blocks would not fill two waves of SMs (not tuned)."""
    chunk = 64
    while chunk > 16 and batch * kv_heads * -(-length // chunk) < 2 * sms:
        chunk //= 2
    return chunk


def decode_attention_cuda(q, k, v, mask, scale):
    check_attention_inputs(q, k, v, mask, scale)
    if not cuda.available():  # the reference backend asked for (LIBORTHO_BACKEND), or no extension (the linears say)
        return decode_attention_reference(q, k, v, mask, scale)
    if not kernel_takes(q, k, v):
        cuda._warn_once(f"attention-{q.dtype}-{q.shape[3]}", "libortho: no CUDA decode-attention kernel for this call "
                        f"(dtype {q.dtype}, head dim {q.shape[3]}, layout); using the float32 reference")
        return decode_attention_reference(q, k, v, mask, scale)
    chunk = attention_chunk(q.shape[0], k.shape[1], k.shape[2], cuda._sms(q.device))  # the linears' cached count
    out = cuda.extension().decode_attention(q, k, v, mask, float(scale), chunk, True, cuda.pdl_mode(q.shape[0]))
    return cuda._checked(out, "decode attention")


decode_attention.register_kernel("cuda")(decode_attention_cuda)
