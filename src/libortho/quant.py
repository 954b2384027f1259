"""Group-wise integer quantization of a weight matrix and the packed base-stream format.

Quantization (convention ``w ~ (q - z) * s``, ``q`` unsigned in ``[0, 2**bits - 1]``):

* groups run along ``in_features`` (K): group ``j`` of a row covers columns ``[j*g, min((j+1)*g, K))``,
  so a group size that does not divide K leaves a shorter last group (``ceil(K / g)`` groups, as GPTQ
  formats do). ``group_size=-1`` means one group per row.
* symmetric: ``s = 2 * max|w| / (2**bits - 1)``, ``z = 2**(bits - 1)`` (fixed, not stored);
  asymmetric: ``s = (max - min) / (2**bits - 1)`` over a range that includes 0, integer ``z`` (stored).
  ``q`` is computed with the scale already rounded to its storage dtype, so the stored base
  reconstructs every element to within half a step.

Packed layout (what the CUDA kernels read; the reference backend unpacks the same bytes):

* the (N, K) code matrix is padded to (N_pad, K_pad), multiples of 16 and 64, and cut into tiles of
  16 rows x 64 columns, stored tile-row-major: ``qweight`` has shape ``(N_pad/16, K_pad/64, 32*bits)``,
  int32. A warp reads one tile as ``32*bits`` consecutive words (512 bytes at INT4: one 16-byte
  load per lane, fully coalesced).
* lane ``l`` of the warp owns ``bits`` consecutive words, holding 32 codes: the A-operand fragments of
  four ``mma.m16n8k16`` steps (k16 step ``s`` = tile columns ``16s .. 16s+15``). Fragment element
  ``j`` (0..7) of lane ``l`` sits at row ``l//4 + 8*((j//2)%2)``, column ``2*(l%4) + j%2 + 8*(j//4)``.
* the 32 codes of a lane form a little-endian bit stream across its words, code ``v`` at bits
  ``[bits*v, bits*v + bits)`` with ``v = 8*s + slot``; within a step the slots hold fragment
  elements in the order ``0, 2, 4, 6, 1, 3, 5, 7``. At INT4 each step is one word and the nibble
  pair ``(word >> 4i) & 0x000F000F`` is exactly the register ``{a_2i, a_2i+1}`` of the fragment,
  ready for a magic-number conversion to two bf16/fp16 values.
* ``scales`` (and ``zeros`` when asymmetric) have shape ``(N_pad/16, G, 16)``: for each tile row the
  16 rows' values of one group are contiguous (32 bytes), so a warp reads them in one sector.
  Padded rows have scale 0; padded columns are never read (the kernels guard ``k < K``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
TILE_N, TILE_K = 16, 64
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    return bits


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not supported; expected one of {SUPPORTED_GROUP_SIZES} "
            "(-1 = one group per row)")
    return group_size


def effective_group_size(group_size: int, in_features: int) -> int:
    """The group length along K (per-row groups span the whole row)."""
    return in_features if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / effective_group_size(group_size, in_features))


def padded_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return (math.ceil(out_features / TILE_N) * TILE_N, math.ceil(in_features / TILE_K) * TILE_K)


@dataclass
class QuantGrid:
    """Per-group scale and (integer) zero point of one weight matrix, logical layout (N, G)."""
    scales: torch.Tensor
    zeros: torch.Tensor | None  # None: symmetric, z = 2**(bits-1)
    bits: int
    group_size: int

    def zero_points(self) -> torch.Tensor:
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.float32)


def _expand_groups(t: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(N, G) per-group values -> (N, K) per-element values."""
    g = effective_group_size(group_size, in_features)
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each group of each row, (N, G) each; a short last group is padded by repeats."""
    n, k = w.shape
    g = effective_group_size(group_size, k)
    groups = math.ceil(k / g)
    pad = groups * g - k
    if pad:  # repeat the row's last element: it changes neither min nor max of the last group
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    w = w.reshape(n, groups, g)
    return w.amin(dim=2), w.amax(dim=2)


def grid_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, group_size: int,
                    symmetric: bool, scale_dtype=torch.float16) -> QuantGrid:
    """Scales (and zeros) for groups with the given ranges; scales rounded to their storage dtype."""
    maxq = 2 ** bits - 1
    wmin = torch.minimum(wmin.float(), torch.zeros_like(wmin, dtype=torch.float32))
    wmax = torch.maximum(wmax.float(), torch.zeros_like(wmax, dtype=torch.float32))
    if symmetric:
        amax = torch.maximum(-wmin, wmax)
        scale = 2 * amax / maxq
    else:
        scale = (wmax - wmin) / maxq
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > tiny, scale, torch.ones_like(scale))
    stored = scale.to(scale_dtype)
    # round the scale up, never down: the group's range must still fit the 2**bits levels
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    scale = stored
    zeros = None
    if not symmetric:
        zeros = torch.clamp(torch.round(-wmin / scale.float()), 0, maxq).to(scale_dtype)
    return QuantGrid(scale, zeros, bits, group_size)


def make_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
              scale_dtype=torch.float16) -> QuantGrid:
    check_bits(bits)
    check_group_size(group_size)
    wmin, wmax = group_minmax(w.float(), group_size)
    return grid_from_range(wmin, wmax, bits, group_size, symmetric, scale_dtype)


def quantize_with_grid(w: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Integer codes (N, K) uint8 of ``w`` on ``grid``."""
    k = w.shape[1]
    s = _expand_groups(grid.scales.float(), k, grid.group_size)
    z = _expand_groups(grid.zero_points(), k, grid.group_size)
    q = torch.clamp(torch.round(w.float() / s) + z, 0, 2 ** grid.bits - 1)
    return q.to(torch.uint8)


def dequantize(q: torch.Tensor, grid: QuantGrid, dtype=torch.float32) -> torch.Tensor:
    k = q.shape[1]
    s = _expand_groups(grid.scales.float(), k, grid.group_size)
    z = _expand_groups(grid.zero_points(), k, grid.group_size)
    return ((q.float() - z) * s).to(dtype)


def quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
             scale_dtype=torch.float16) -> tuple[torch.Tensor, QuantGrid]:
    """Round-to-nearest group-wise quantization of a 2-D weight: returns (codes, grid)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    grid = make_grid(w, bits, group_size, symmetric, scale_dtype)
    return quantize_with_grid(w, grid), grid


# ---------------------------------------------------------------------------------------------------
# Packing

def _fragment_map() -> torch.Tensor:
    """(32 lanes, 32 codes) -> flat index r*64 + c inside a 16x64 tile, in bit-stream order."""
    slot_to_elem = (0, 2, 4, 6, 1, 3, 5, 7)
    idx = torch.empty(32, 32, dtype=torch.long)
    for lane in range(32):
        for step in range(4):
            for slot, j in enumerate(slot_to_elem):
                r = lane // 4 + 8 * ((j // 2) % 2)
                c = 16 * step + 2 * (lane % 4) + (j % 2) + 8 * (j // 4)
                idx[lane, 8 * step + slot] = r * TILE_K + c
    return idx


_FRAGMENT_MAP = _fragment_map()
_FRAGMENT_MAPS: dict = {}


def _fragment_map_on(device) -> torch.Tensor:
    """The fragment map on ``device``, copied there once (no host-to-device copy per forward, which
    would also break CUDA graph capture of the reference backend)."""
    device = torch.device(device)
    m = _FRAGMENT_MAPS.get(device)
    if m is None:
        m = _FRAGMENT_MAPS[device] = _FRAGMENT_MAP.to(device)
    return m


def _to_tiles(t: torch.Tensor) -> torch.Tensor:
    """(N_pad, K_pad) -> (N_pad/16, K_pad/64, 1024) tile-major."""
    n, k = t.shape
    return t.reshape(n // TILE_N, TILE_N, k // TILE_K, TILE_K).permute(0, 2, 1, 3).reshape(
        n // TILE_N, k // TILE_K, TILE_N * TILE_K)


def _from_tiles(t: torch.Tensor) -> torch.Tensor:
    tn, tk, _ = t.shape
    return t.reshape(tn, tk, TILE_N, TILE_K).permute(0, 2, 1, 3).reshape(tn * TILE_N, tk * TILE_K)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (N, K) into the tile layout ``(N_pad/16, K_pad/64, 32*bits)`` int32."""
    check_bits(bits)
    n, k = q.shape
    if q.numel() and int(q.max()) >= 2 ** bits:
        raise ValueError(f"codes exceed {bits} bits (max {int(q.max())})")
    n_pad, k_pad = padded_shape(n, k)
    full = torch.zeros(n_pad, k_pad, dtype=torch.int64, device=q.device)
    full[:n, :k] = q.to(torch.int64)
    codes = _to_tiles(full)[..., _fragment_map_on(q.device)]  # (tn, tk, 32 lanes, 32 codes)
    words = torch.zeros(*codes.shape[:3], bits + 1, dtype=torch.int64, device=q.device)
    for v in range(32):
        pos = bits * v
        w, off = divmod(pos, 32)
        words[..., w] |= codes[..., v] << off
        if off + bits > 32:  # the code straddles two words (INT3)
            words[..., w + 1] |= codes[..., v] >> (32 - off)
    words = words[..., :bits] & 0xFFFFFFFF
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # reinterpret as int32
    return words.to(torch.int32).reshape(*codes.shape[:2], 32 * bits)


def unpack(qweight: torch.Tensor, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack`: codes (N, K) uint8."""
    check_bits(bits)
    tn, tk, width = qweight.shape
    if width != 32 * bits:
        raise ValueError(f"qweight last dim {width} does not match bits={bits} (expected {32 * bits})")
    words = qweight.reshape(tn, tk, 32, bits).to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)
    mask = 2 ** bits - 1
    codes = torch.empty(tn, tk, 32, 32, dtype=torch.int64, device=qweight.device)
    for v in range(32):
        w, off = divmod(bits * v, 32)
        val = words[..., w] >> off
        if off + bits > 32:
            val = val | (words[..., w + 1] << (32 - off))
        codes[..., v] = val & mask
    tiles = torch.empty(tn, tk, TILE_N * TILE_K, dtype=torch.int64, device=qweight.device)
    tiles[..., _fragment_map_on(qweight.device).reshape(-1)] = codes.reshape(tn, tk, -1)
    return _from_tiles(tiles)[:out_features, :in_features].to(torch.uint8)


def pack_group_params(t: torch.Tensor) -> torch.Tensor:
    """Per-group (N, G) values -> tile layout (N_pad/16, G, 16); padded rows are 0."""
    n, g = t.shape
    n_pad = math.ceil(n / TILE_N) * TILE_N
    full = torch.zeros(n_pad, g, dtype=t.dtype, device=t.device)
    full[:n] = t
    return full.reshape(n_pad // TILE_N, TILE_N, g).permute(0, 2, 1).contiguous()


def unpack_group_params(t: torch.Tensor, out_features: int) -> torch.Tensor:
    tn, g, _ = t.shape
    return t.permute(0, 2, 1).reshape(tn * TILE_N, g)[:out_features]


def dequantize_packed(qweight, scales, zeros, bits, group_size, out_features, in_features,
                      dtype=torch.float32) -> torch.Tensor:
    """Dense (N, K) base weight from the packed buffers."""
    q = unpack(qweight, bits, out_features, in_features)
    grid = QuantGrid(unpack_group_params(scales, out_features),
                     None if zeros is None else unpack_group_params(zeros, out_features), bits, group_size)
    return dequantize(q, grid, dtype)
