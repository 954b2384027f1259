"""CUDA backend of ``libortho::ortho_linear``: JIT build of csrc/ and the dispatch by batch size.

* M <= 16 rows: one fused kernel (packed base + CSR ortho stream, one pass). Three variants: ``v1``
  (tensor cores, register double buffer, one block per 16 output rows), ``v2`` (tensor cores, cp.async
  stages in shared memory, cluster split-K on sm_90, nnz-balanced ortho rows) and ``v3`` (no tensor
  cores: a bandwidth-bound GEMV for M = 1..4, x staged once in shared memory, cluster split-K; it runs
  v1 for shapes whose x slice does not fit, see v3.cu). ``LIBORTHO_DECODE_KERNEL=v1|v2|v3`` picks
  one (read at each call; default ``DEFAULT_DECODE_KERNEL``), :func:`set_decode_kernel` overrides it
  from Python.
* INT4 v1 at M <= 16 runs one of its tuning configurations (``benchmarks/probes/v1_configs.py``) per class
  of call (``V1_CLASSES``); ``LIBORTHO_V1_CFG="tall_m4=4,short_m4=3"`` replaces entries of that table for a
  tuning run (read once, when the extension loads; :func:`v1_table` shows the table in use).
* v1's ortho stream at M >= 2 reads x transposed (one small transpose launch first) when
  nnz * M * max(M, 4) / 4 is at least a threshold: ``LIBORTHO_ORTHO_XT=auto`` (the default,
  ``ORTHO_XT_AUTO``), ``on``, ``off`` or a number.
* ``LIBORTHO_V1_LEAN=on|off`` (default on, read when the extension loads): INT4 v1 ring calls that the ring takes
  whole (64-column tiles, groups of 64-256 or one per row, aligned x) run the configuration's lean kernel,
  compiled without the fallback paths (a third to half of the code); :func:`set_v1_lean` from Python.
* M > 16: ``LIBORTHO_PREFILL=auto`` (the default; read at each call, :func:`set_prefill` from Python) runs calls
  of 17-32 tokens that v1's ring takes whole through v1 (its table's M <= 32 classes; an ortho stream in play, up to
  a measured nnz * M per weight, by the ortho add after it: :func:`use_v1_wide`), and those of 33-64 tokens on
  layers whose 32-row blocks make one wave filling at least half the SMs (class m64), other calls of up to
  ``GEMM_M_MAX`` tokens that the one-kernel GEMM takes (INT4, in_features a multiple of 64, groups of a multiple
  of 64 columns or one per row, an sm_90 GPU) through it (gemm_sm90.cu: the base dequantized in registers into
  Hopper's wgmma, split along K on short grids; the ortho stream, if alpha != 0, added after it
  by ortho_add.cu), and everything else through dequantize + cuBLAS: one kernel dequantizes the base and merges
  alpha * S into a bf16/fp16 weight, then cuBLAS. ``gemm`` sends every call the GEMM takes to it (at any M;
  above 64 tokens only alpha 0 or no ortho entries), ``dequant`` none. A build that found CUTLASS's headers (see
  :func:`cutlass_include`) has CUTLASS's mixed-input GEMM too (gemm_cutlass.cu: the packed tiles read as they are;
  INT4, N % 16 == 0, K % 64 == 0, no ortho stream in play): ``auto`` gives it the calls of 65-512 tokens whose
  tiles fill the GPU's waves, in cooperative 128x128 or ping-pong 64x128 form (:func:`cutlass_form`), ``cutlass``
  every call it takes; the rest go to dequantize + cuBLAS.

The extension is built on first use with ``torch.utils.cpp_extension.load`` for the GPU present and
cached in ``$LIBORTHO_BUILD_DIR`` (default ``~/.cache/libortho/build``). Set
``LIBORTHO_BACKEND=reference`` to force the pure-PyTorch path. If the build fails the reference path
runs instead, and a warning says so once.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .reference import NORM_TILE, add_norm_reference, glu_from_interleaved, ortho_linear_reference, rms_finish
from .registry import ortho_glu, ortho_glu_rms, ortho_linear, ortho_linear_add_norm, ortho_linear_rms

CSRC = Path(__file__).with_name("csrc")
SMALL_M_MAX = 16  # measured: above this the dequantize + cuBLAS path is faster (see benchmarks)
DECODE_KERNELS = ("v1", "v2", "v3")
DEFAULT_DECODE_KERNEL = "v1"  # H200, 2026-11-29: v3 wins at M = 1 on 5 of 6 Llama shapes but loses 2-6x from M = 2 on
_FUSED = {"v1": "fused_small_m", "v2": "fused_small_m_v2", "v3": "fused_small_m_v3"}
_state = {"ext": None, "error": None, "warned": set(), "decode": None, "prefill": None}
PREFILLS = ("auto", "dequant", "gemm", "cutlass")  # cutlass: a build with CUTLASS (gemm_cutlass.cu)
# auto: the GEMM up to here (H200, 2026-11-30: 0.88-1.45x bf16 time at M 32-64 against 1.4-2.5x for dequantize +
# cuBLAS; from M = 512 the latter wins, 1.44-1.50x against 1.53-1.76x on the Llama shapes); also the ortho add's limit.
GEMM_M_MAX = 64
# The classes of the v1 configuration table (kernels.h, in its order) and the configurations each can take.
V1_CLASSES = ("short_long_k", "short_m4", "short_m8", "tall_m4", "tall_m8", "m16", "m16_tall", "tiny",
              "m16_long_k", "m32", "m32_tiny", "m64")
# The largest M of each v1 tuning configuration (v1.cuh kV1CfgMaxM, v1_configs.cu fused_cfg_dispatch, in its order) and of each
# class: a class takes the configurations of its kernel (M <= 8, 16, 32 or 64: its n8 column blocks) that reach its
# largest M.
V1_CONFIG_MAX_M = ((8,) * 6 + (16,) * 2 + (4, 8, 16) + (8, 16) + (4, 8, 8, 4) + (4, 8, 4, 8, 8, 16) + (4, 8, 4)
                   + (32,) * 4 + (64, 64, 32))
_V1_CLASS_MAX_M = {"short_long_k": 4, "short_m4": 4, "short_m8": 8, "tall_m4": 4, "tall_m8": 8, "m16": 16,
                   "m16_tall": 16, "tiny": 8, "m16_long_k": 16, "m32": 32, "m32_tiny": 32, "m64": 64}
_V1_CLASS_CONFIGS = {c: tuple(i for i, mm in enumerate(V1_CONFIG_MAX_M) if mm >= cm and -(-mm // 8) == -(-cm // 8))
                     for c, cm in _V1_CLASS_MAX_M.items()}


ORTHO_XT_AUTO = 1 << 21  # nnz * M * max(M, 4) / 4 from which v1's ortho stream reads x transposed (H200 sweep:
# results/kernels-H200-ortho-xt-{on,off}.json; 0.08 % above the faster of the two on average, at most 5 %)


def parse_ortho_xt(value: str) -> int:
    """$LIBORTHO_ORTHO_XT -> the threshold on nnz * M * max(M, 4) / 4 (-1: never); ValueError names what is wrong."""
    v = value.strip().lower()
    named = {"": ORTHO_XT_AUTO, "auto": ORTHO_XT_AUTO, "on": 0, "off": -1}
    if v in named:
        return named[v]
    try:
        n = int(v)
    except ValueError:
        n = -2
    if n < 0:
        raise ValueError(f"LIBORTHO_ORTHO_XT={value!r}; expected auto, on, off or a non-negative entry count")
    return n


def parse_v1_lean(value: str) -> bool:
    """$LIBORTHO_V1_LEAN -> whether ring calls run the lean kernels; ValueError names what is wrong."""
    v = value.strip().lower()
    if v in ("", "on", "1"):
        return True
    if v in ("off", "0"):
        return False
    raise ValueError(f"LIBORTHO_V1_LEAN={value!r}; expected on or off")


def set_v1_lean(on: bool) -> None:
    """Whether INT4 v1 ring calls that the ring takes whole run the lean kernels (else the full ones)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("libortho CUDA: the extension is not available")
    ext.set_v1_lean(bool(on))


def v1_lean() -> bool | None:
    """Whether the lean kernels are in use, or None without the extension."""
    ext = extension()
    return ext.v1_lean() if ext is not None else None


def parse_v1_table(spec: str) -> dict[str, int]:
    """'class=index,...' (``$LIBORTHO_V1_CFG``) -> {class: configuration index}; ValueError names what is wrong."""
    out = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in _V1_CLASS_CONFIGS:
            raise ValueError(f"LIBORTHO_V1_CFG: {item!r} is not class=index; classes: {', '.join(V1_CLASSES)}")
        try:
            index = int(value)
        except ValueError:
            raise ValueError(f"LIBORTHO_V1_CFG: {item!r}: the index must be an integer") from None
        allowed = _V1_CLASS_CONFIGS[name]
        if index not in allowed:
            raise ValueError(f"LIBORTHO_V1_CFG: {item!r}: class {name} takes configurations "
                             f"{', '.join(map(str, allowed))}")
        out[name] = index
    return out


def v1_table() -> dict[str, int] | None:
    """The INT4 v1 configuration per class of call in use, or None without the extension."""
    ext = extension()
    return dict(zip(V1_CLASSES, ext.v1_table())) if ext is not None else None


def _apply_v1_table(ext, spec: dict[str, int]) -> None:
    table = dict(zip(V1_CLASSES, ext.v1_table()))
    table.update(spec)
    if not ext.set_v1_table([table[c] for c in V1_CLASSES]):
        raise RuntimeError(f"libortho CUDA: the kernels refused the v1 table {table}")


def decode_kernel() -> str:
    """The small-M kernel variant in use: set_decode_kernel(), else $LIBORTHO_DECODE_KERNEL, else the default."""
    v = _state["decode"] or os.environ.get("LIBORTHO_DECODE_KERNEL") or DEFAULT_DECODE_KERNEL
    if v not in DECODE_KERNELS:
        raise ValueError(f"LIBORTHO_DECODE_KERNEL={v!r} is not a decode kernel; expected one of {DECODE_KERNELS}")
    return v


def prefill() -> str:
    """The M > 16 path policy in use: set_prefill(), else $LIBORTHO_PREFILL, else 'auto'."""
    v = _state["prefill"] or os.environ.get("LIBORTHO_PREFILL") or "auto"
    if v not in PREFILLS:
        raise ValueError(f"LIBORTHO_PREFILL={v!r} is not a prefill path; expected one of {PREFILLS}")
    return v


def set_prefill(path: str | None) -> None:
    """Force the M > 16 policy ('auto', 'dequant' or 'gemm'); None goes back to $LIBORTHO_PREFILL."""
    if path is not None and path not in PREFILLS:
        raise ValueError(f"prefill path {path!r} is not one of {PREFILLS}")
    _state["prefill"] = path


GEMM_CFGS = 8  # gemm_sm90.cu's block configurations (kernels.h kGemmCfgs); -1 = chosen per call (gemm_pick)


def parse_gemm_cfg(value: str) -> int:
    """$LIBORTHO_GEMM_CFG: the large-M GEMM kernel's block configuration for a probe ('' or 'auto' = -1, per call)."""
    if value in ("", "auto"):
        return -1
    if not value.isdigit() or int(value) >= GEMM_CFGS:
        raise ValueError(f"LIBORTHO_GEMM_CFG={value!r}: expected 'auto' or a configuration number 0-{GEMM_CFGS - 1}")
    return int(value)


def cutlass_takes(x2, bits, group_size, out_features, in_features, alpha, values) -> bool:
    """Whether CUTLASS's mixed-input GEMM (gemm_cutlass.cu) can run this call (the C++ side checks the same)."""
    ext = _state["ext"]
    return (ext is not None and ext.gemm_cutlass_built() and bits == 4 and out_features % 16 == 0
            and in_features % 64 == 0 and (group_size % 64 == 0 or group_size >= in_features)
            and (alpha == 0 or values.numel() == 0) and x2.data_ptr() % 16 == 0)


def gemm_takes(x2, bits, group_size, in_features, alpha, values) -> bool:
    """Whether the large-M GEMM (gemm_sm90.cu + ortho_add.cu) can run this call (the C++ launcher checks the same)."""
    ortho = alpha != 0 and values.numel() > 0
    return (bits == 4 and in_features % 64 == 0 and (group_size % 64 == 0 or group_size >= in_features)
            and (not ortho or x2.shape[0] <= GEMM_M_MAX) and x2.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(x2.device) == (9, 0))


# auto, alpha != 0 with ortho entries: the GEMM + ortho add (ortho_add.cu) only where it beat the merge into the
# dequantized weight on the H200 (2026-11-30, benchmarks/results/kernels-H200-ortho-add-{gemm,dequant}.json and,
# for the add in passes of 32 tokens, kernels-H200-ortho-add-passes-{gemm,dequant}.json at M 32/48/64): nnz * M at
# most 0.64 weights (density up to about 2 % at M = 32, 1 % at M = 64), and at M <= 32 a layer of at least 2^24
# weights (0.60-0.96x the merge path's time), at M 33-64 of at least 4e7 (4096x11008: 0.73-0.86x up to 1 %,
# 14336x4096 and 4096x14336 0.74-0.91x; 11008x4096 0.91-0.96x at 0.5 % but 1.02-1.05x at 1 %). Elsewhere the merge
# path was as fast or faster.
GEMM_ORTHO_WORK_PER_WEIGHT = 0.64
# Room over a measured nnz * M limit: a sieve asked for a density may keep an entry or two more (it rounds up), and
# without room the kernel tables of 2026-11-30 sent 4096x14336 and 14336x4096 at M = 32 and 5 %, and the 7B/8B
# shapes at M = 64 and 1 %, to the merge path by those entries.
SIEVE_HEADROOM = 1.005
GEMM_ORTHO_MIN_WEIGHTS = {32: 1 << 24, 64: 40_000_000}


# auto, M > GEMM_M_MAX with no ortho stream in play: CUTLASS's mixed-input GEMM for M <= 512 in one of two forms
# (gemm_cutlass.cu), where it measured faster than dequantize + cuBLAS on the H200 (2026-11-30). Its time is about
# (waves of tiles) x (one tile's pass over K). Cooperative 128x128 tiles (form 0, ~28 us a wave at K = 4096) where
# they fill >= 0.6 of their waves' slots: 0.42-0.93x the dequant path's time at M 128-512 (14336x4096 at M = 128:
# 30.9 against 74.2 us; 4096x14336 at M = 512: 91.7 against 113.9; results/cutlass-vs-dequant-H200.json). Ping-pong
# 64x128 tiles (form 1, ~21.5 us a wave, half the work) where the cooperative ones fill < 0.6 of one wave, its own
# fill 0.45-1 of one wave (its gain is a shorter single wave), and the layer has at least 2^24 weights: 0.75-0.90x the
# dequant path on the 4096-row Llama shapes at M 128-256 (4096x14336 at M = 256: 65.3 against 87.6 us;
# results/cutlass-tiles-H200.json). Smaller layers on short grids (1024x4096: 21.5 against 12.5-15.1 us) and M >= 1024
# (0.93-1.11x, 11 of 12 slower or within 1 %) stay with dequantize + cuBLAS.
CUTLASS_M_MAX = 512
CUTLASS_MIN_FILL = 0.6
CUTLASS_PING_MIN_FILL = 0.45
CUTLASS_PING_MIN_WEIGHTS = 1 << 24
CUTLASS_FORMS = {0: (128, 128), 1: (64, 128)}  # form: (weight rows, tokens) per tile


def _tiles(form: int, m: int, out_features: int) -> int:
    rows, tokens = CUTLASS_FORMS[form]
    return -(-out_features // rows) * -(-m // tokens)


def cutlass_form(policy: str, m: int, out_features: int, in_features: int, sms: int) -> int | None:
    """The CUTLASS form (0 cooperative 128x128, 1 ping-pong 64x128) a call of m tokens with no ortho stream in play
    runs under this policy, or None for another path (when CUTLASS can take it); sms: the GPU's multiprocessor count."""
    if policy not in ("auto", "cutlass") or (policy == "auto" and not GEMM_M_MAX < m <= CUTLASS_M_MAX):
        return None
    coop = _tiles(0, m, out_features)
    if coop >= CUTLASS_MIN_FILL * -(-coop // sms) * sms:  # the cooperative tiles fill their waves
        return 0
    if (coop < CUTLASS_MIN_FILL * sms and CUTLASS_PING_MIN_FILL * sms <= _tiles(1, m, out_features) <= sms
            and out_features * in_features >= CUTLASS_PING_MIN_WEIGHTS):
        return 1
    return 0 if policy == "cutlass" else None


def _sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cache = _state.setdefault("sms", {})
    if idx not in cache:
        cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return cache[idx]


# auto, M 17-32: v1's x ring with 4 n8 column blocks (v1.cu's table, classes m32 and m32_tiny) where the ring takes
# the whole call. H200 probe of 2026-11-30 05:2x UTC (results/v1-configs-H200-m32.json against the GEMM in
# kernels-H200-m17-64-gemm.json), alpha 0: 0.55-0.93x the GEMM's time at M 17-32 on the six Llama shapes (4096x14336
# M = 32: 24.5 against 44.5 us; 14336x4096 32.3 against 34.5); at M 48-64 its 8-block form (configuration 30) lost
# (4096x4096 M = 64: 19.1 against 16.3 us); see M 33-64 below. With an ortho stream in play v1 runs the base and the
# ortho add follows, where that beat the merge path (benchmarks/probes/v1_add_vs_merge.py, 2026-11-30 05:4x UTC,
# results/v1-add-vs-merge-H200-m17-32.json): on the five large Llama shapes at every density measured, 0.5-5 %
# (0.33-0.92x the merge's time; 4096x14336 M = 32 at 5 %: 76.5 against 111.0 us), i.e. nnz * M up to 1.6 weights on
# layers of 2^24+ weights; on 1024x4096 only up to 1 % (0.89-1.00x; 1.05-1.32x at 2-5 %), nnz * M up to 0.32 weights.
# M 33-64: configuration 31 (class m64: 32-row blocks, their sums kept in the x ring) where its blocks make one wave
# that fills at least half the SMs. H200 probe of 2026-11-30 06:2x UTC (results/v1-configs-H200-sums-in-ring.json
# against the GEMM in results/kernels-H200-m48-64.json), alpha 0: on the three 4096-row Llama shapes 0.66-0.84x the
# GEMM's time (4096x14336 M = 48: 34.8 against 46.4 us); on taller grids it lost (11008x4096 0.95-1.01x, 14336x4096
# 1.31-1.40x) and on 1024x4096 (32 blocks: 12.2 against 7.6 us). With an ortho stream in play it runs where the
# GEMM would (use_gemm: the same ortho add follows either base).
V1_WIDE_M_MAX = 64
V1_M32_MAX = 32
V1_M64_ROWS = 32  # rows of a configuration-31 block
V1_ADD_WORK_PER_WEIGHT = {True: 1.6, False: 0.32}  # layer of 2^24+ weights? -> the largest nnz * M / weights measured to win
V1_ADD_LARGE_WEIGHTS = 1 << 24


def use_v1_wide(policy: str, m: int, ortho_work: int = 0, weights: int = 0, out_features: int = 0,
                sms: int = 0) -> bool:
    """Whether a call of m > 16 tokens goes to v1 under this policy (when v1_wide_takes); ortho_work and weights as
    for use_gemm; out_features and sms (the GPU's multiprocessor count) matter above 32 tokens."""
    if policy != "auto" or not SMALL_M_MAX < m <= V1_WIDE_M_MAX:
        return False
    if m > V1_M32_MAX:
        blocks = -(-out_features // V1_M64_ROWS)
        return 0 < blocks <= sms <= 2 * blocks and use_gemm(policy, m, ortho_work, weights)
    return ortho_work <= SIEVE_HEADROOM * V1_ADD_WORK_PER_WEIGHT[weights >= V1_ADD_LARGE_WEIGHTS] * weights


def v1_wide_takes(x2, bits, group_size, in_features) -> bool:
    """Whether v1's ring takes a call of 17-64 tokens whole (v1.cuh v1_lean_ok: INT4, whole 64-column tiles, groups
    of 64-512 columns (a power of two) or one per row, x rows 16-byte aligned)."""
    groups = group_size >= in_features or group_size in (64, 128, 256, 512)
    return bits == 4 and in_features % 64 == 0 and groups and x2.data_ptr() % 16 == 0


def use_gemm(policy: str, m: int, ortho_work: int = 0, weights: int = 0) -> bool:
    """Whether a call of m > 16 tokens goes to the GEMM under this policy (when the GEMM takes it). ortho_work:
    nnz * m when an ortho stream is in play (alpha != 0), else 0; weights: out_features * in_features."""
    if policy != "auto":
        return policy == "gemm"
    if m > GEMM_M_MAX:
        return False
    if ortho_work == 0:
        return True
    min_weights = GEMM_ORTHO_MIN_WEIGHTS[32 if m <= 32 else 64]
    return weights >= min_weights and ortho_work <= SIEVE_HEADROOM * GEMM_ORTHO_WORK_PER_WEIGHT * weights


# $LIBORTHO_PDL values and their kernels.h kPdl* bits (on 1, late trigger 2, no prefetch 4, first tiles only 8)
PDL_MODES = {"0": 0, "1": 1, "early": 1, "late": 3, "noprefetch": 5, "late-noprefetch": 7, "first": 9,
             "late-first": 11, "first-noxt": 25}
_PDL_NAMES = {0: "off", **{bits: name for name, bits in PDL_MODES.items() if name[:1].isalpha()}}


def pdl_mode(m: int | None = None) -> int:
    """The kPdl* bits of a call of ``m`` rows (None: the mode itself): $LIBORTHO_PDL's, or 0 where ``m`` exceeds
    $LIBORTHO_PDL_MAX_M (pdl_max_m). $LIBORTHO_PDL: how the v1 decode kernel and decode attention use programmatic
    dependent launch (Hopper); unset, "first" on sm_90 and later, else off ("0"; pdl_default). "1" / "early":
    launched with it, v1's blocks prefetch their weight strip into L2 while the previous kernel drains (common.cuh),
    and each kernel lets its dependents launch right after its wait; "late": after the kernel's main loop (dependent
    blocks hold SM slots while they wait); "noprefetch" / "late-noprefetch": the same without the prefetch; "first" /
    "late-first": the prefetch cut to the tiles each warp requests first (their HBM latency overlaps the kernel before);
    "first-noxt": "first", but a product launched right after its transpose of x (M >= 2 with ortho) plainly.
    Every mode gives the bits of plain launches (test_cuda_norms, test_bench_decode). Only "first" for one-row calls
    won: 7B shape, batch 1, +2.8 % at alpha 0 and +0.9 % at alpha 1, batch 8 equal (H200, session 44); at every M it
    lost 5.2 % at batch 8, alpha 1; "first-noxt" at every M: batch 8 alpha 0 +1.2 %, alpha 1 -0.5 % (session 45); the
    other modes lost at batch 1 (benchmarks/NOTES-kernels.md, NOTES-decode.md sessions 35-45)."""
    value = os.environ.get("LIBORTHO_PDL", "").strip().lower() or pdl_default()
    if value not in PDL_MODES:
        raise ValueError(f"LIBORTHO_PDL={value!r}: expected one of {sorted(PDL_MODES)}, or unset for the default")
    limit = pdl_max_m()
    return 0 if m is not None and limit is not None and m > limit else PDL_MODES[value]


def pdl_default() -> str:
    """$LIBORTHO_PDL's value when unset: "first" where the current card has programmatic dependent launch (compute
    capability 9.0 and later), else "0"."""
    try:
        return "first" if torch.cuda.get_device_capability()[0] >= 9 else "0"
    except (AssertionError, RuntimeError):  # a build or machine without CUDA
        return "0"


def pdl_max_m() -> int | None:
    """$LIBORTHO_PDL_MAX_M: the most rows (tokens; the batch for decode attention) a call may have to be launched with
    PDL; "none": no limit. Unset: 1, where "first" won (batch 1) without batch 8's loss (sessions 43 and 44)."""
    value = os.environ.get("LIBORTHO_PDL_MAX_M", "").strip().lower() or "1"
    if value == "none":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LIBORTHO_PDL_MAX_M={value!r}: expected a positive number of rows, or none for no limit")
    return int(value)


def pdl_enabled() -> bool:
    """Whether LibOrtho's kernels are launched with programmatic dependent launch ($LIBORTHO_PDL, pdl_mode)."""
    return pdl_mode() != 0


def pdl_name() -> str:
    """$LIBORTHO_PDL's mode by name, for result files: "off", "early", "late", "noprefetch", "late-noprefetch", "first",
    "late-first" or "first-noxt"."""
    return _PDL_NAMES[pdl_mode()]


def set_decode_kernel(variant: str | None) -> None:
    """Force the small-M kernel variant ('v1', 'v2' or 'v3'); None goes back to $LIBORTHO_DECODE_KERNEL."""
    if variant is not None and variant not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {variant!r} is not one of {DECODE_KERNELS}")
    _state["decode"] = variant


def _warn_once(key: str, msg: str) -> None:
    if key not in _state["warned"]:
        _state["warned"].add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def build_dir() -> Path:
    d = Path(os.environ.get("LIBORTHO_BUILD_DIR", Path.home() / ".cache" / "libortho" / "build"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _arch_flags() -> list[str]:
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    suffix = "a" if major == 9 and minor == 0 else ""  # Hopper-specific target on sm_90
    return [f"-gencode=arch=compute_{cc}{suffix},code=sm_{cc}{suffix}"]


def cutlass_include() -> Path | None:
    """CUTLASS's include folder for gemm_cutlass.cu: $LIBORTHO_CUTLASS_DIR/include (a CUTLASS source tree), else the
    nvidia-cutlass wheel's (``pip install --no-deps nvidia-cutlass``), else None (built without it).
    $LIBORTHO_CUTLASS=0 leaves it out."""
    if os.environ.get("LIBORTHO_CUTLASS") == "0":
        return None
    root = os.environ.get("LIBORTHO_CUTLASS_DIR")
    if root:
        inc = Path(root) / "include"
        if not (inc / "cutlass" / "cutlass.h").is_file():
            raise ValueError(f"LIBORTHO_CUTLASS_DIR={root!r} has no include/cutlass/cutlass.h")
        return inc
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")  # found without importing it (its deps may be missing)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        inc = Path(loc) / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            return inc
    return None


def _cutlass_flags() -> tuple[list[str], list[str]]:
    """(include paths, nvcc flags) that build gemm_cutlass.cu with CUTLASS: sm_90 only, where CUTLASS is found."""
    inc = cutlass_include()
    if inc is None or torch.cuda.get_device_capability() != (9, 0):
        return [], []
    return [str(inc)], ["-DLIBORTHO_WITH_CUTLASS=1", "--expt-relaxed-constexpr"]


def _extra_flags() -> list[str]:
    """More nvcc flags from $LIBORTHO_NVCC_FLAGS (e.g. -lineinfo for a source-level profile)."""
    return os.environ.get("LIBORTHO_NVCC_FLAGS", "").split()


def build(verbose: bool = False):
    """Build (or load from the cache) the extension; returns True when the CUDA kernels are usable."""
    if _state["ext"] is not None:
        return True
    if _state["error"] is not None:
        return False
    spec = parse_v1_table(os.environ.get("LIBORTHO_V1_CFG", ""))  # a bad value raises before the build
    xt_min = parse_ortho_xt(os.environ.get("LIBORTHO_ORTHO_XT", ""))
    lean = parse_v1_lean(os.environ.get("LIBORTHO_V1_LEAN", ""))
    gemm_cfg = parse_gemm_cfg(os.environ.get("LIBORTHO_GEMM_CFG", ""))
    try:
        from torch.utils.cpp_extension import load
        cutlass_inc, cutlass_flags = _cutlass_flags()
        _state["ext"] = load(name="libortho_cuda_v2", sources=[str(CSRC / "binding.cpp"), *map(str, sorted(CSRC.glob("*.cu")))],
                             extra_cflags=["-O3"], extra_include_paths=cutlass_inc,
                             extra_cuda_cflags=["-O3", *_arch_flags(), *cutlass_flags, *_extra_flags()],
                             build_directory=str(build_dir()), verbose=verbose)
    except Exception as e:  # compiler missing, unsupported GPU, ...
        _state["error"] = e
        _warn_once("build", f"libortho: the CUDA kernels could not be built ({e}); using the slow "
                            "pure-PyTorch reference on the GPU")
        return False
    if spec:
        _apply_v1_table(_state["ext"], spec)
    _state["ext"].set_ortho_xt_min(xt_min)
    _state["ext"].set_v1_lean(lean)
    _state["ext"].set_gemm_cfg(gemm_cfg)
    return True


def extension():
    """The compiled module (fused_small_m, fused_small_m_v2, fused_small_m_v3, dequant_merge), building it if
    needed; None if unavailable."""
    return _state["ext"] if build() else None


def available() -> bool:
    return torch.cuda.is_available() and os.environ.get("LIBORTHO_BACKEND") != "reference" and build()


def _as(t, dtype, name):
    if t is None or t.dtype == dtype:
        return t
    _warn_once(f"cast-{name}", f"libortho: {name} is {t.dtype} but activations are {dtype}; casting on every "
                               "call (convert the model with .to(dtype) to avoid it)")
    return t.to(dtype)


def _checked(result, what: str = "kernel"):
    """The binding returns (tensor, code): 0 ok, -1 invalid arguments, > 0 a CUDA error (binding.cpp)."""
    out, code = result
    if code == -1:
        raise RuntimeError(f"libortho CUDA: invalid arguments for the {what} (shapes, dtypes or layout do not "
                           "match the packed format, or M outside 1..64 for the fused kernel)")
    if code:
        raise RuntimeError(f"libortho CUDA: the {what} launch failed with cudaError {code}")
    return out


def _operands(x, scales, zeros, values, bias, in_features):
    """x as a contiguous (M, K) matrix (4-byte aligned) and the floating buffers in its dtype."""
    dt = x.dtype
    scales, zeros, values, bias = (_as(scales, dt, "scales"), _as(zeros, dt, "zeros"),
                                   _as(values, dt, "ortho values"), _as(bias, dt, "bias"))
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous() or x2.data_ptr() % 4:
        x2 = x2.contiguous()
    return x2, scales, zeros, values, bias


def ortho_linear_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                      out_features, in_features):
    supported = x.dtype in (torch.float16, torch.bfloat16) and in_features % 2 == 0
    if not supported or not available():
        if not supported:
            _warn_once(f"unsupported-{x.dtype}-{in_features}",
                       f"libortho: no CUDA kernel for {x.dtype} activations with in_features={in_features}; "
                       "using the slow reference path")
        return ortho_linear_reference(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits,
                                      group_size, out_features, in_features)
    x2, scales, zeros, values, bias = _operands(x, scales, zeros, values, bias, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    if m <= SMALL_M_MAX:
        fused = getattr(_state["ext"], _FUSED[decode_kernel()])
        y = _checked(fused(x2, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                           out_features, in_features, pdl_mode(m)), "fused kernel")
        return y.reshape(*x.shape[:-1], out_features)
    # M > 16: one reading of the policy ($LIBORTHO_PREFILL) and of what its rules weigh, for every path below
    policy, sms = prefill(), _sms(x2.device)
    work, weights = (values.numel() * m if alpha != 0 else 0), out_features * in_features
    if (use_v1_wide(policy, m, work, weights, out_features, sms)
            and v1_wide_takes(x2, bits, group_size, in_features)):
        y = _checked(_state["ext"].fused_small_m(x2, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits,
                                                 group_size, out_features, in_features, pdl_mode(m)),
                     "fused kernel")
    elif ((form := cutlass_form(policy, m, out_features, in_features, sms)) is not None
          and cutlass_takes(x2, bits, group_size, out_features, in_features, alpha, values)):
        y = _checked(_state["ext"].gemm_cutlass(x2, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha,
                                                bits, group_size, out_features, in_features, form), "CUTLASS GEMM")
    elif use_gemm(policy, m, work, weights) and gemm_takes(x2, bits, group_size, in_features, alpha, values):
        y = _checked(_state["ext"].gemm_int4(x2, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits,
                                             group_size, out_features, in_features), "large-M GEMM kernel")
    else:
        w = _checked(_state["ext"].dequant_merge(x2, qweight, scales, zeros, row_ptr, col_idx, values, alpha,
                                                 bits, group_size, out_features, in_features), "dequant kernel")
        y = F.linear(x2, w, bias)
    return y.reshape(*x.shape[:-1], out_features)


ortho_linear.register_kernel("cuda")(ortho_linear_cuda)


def glu_epilogue_takes(x, out_features: int, in_features: int) -> bool:
    """Whether v1 writes silu(gate) * up itself: the decode kernel v1 at M 1-16, fp16 / bf16, whole 16-row tiles."""
    m = x.numel() // in_features if in_features else 0
    return (x.dtype in (torch.float16, torch.bfloat16) and in_features % 2 == 0 and 1 <= m <= SMALL_M_MAX
            and out_features % 16 == 0 and decode_kernel() == "v1" and available())


def ortho_glu_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                   out_features, in_features):
    """libortho::ortho_glu: v1's epilogue pairs each tile's gate and up rows where it runs (glu_epilogue_takes), else
    the op's product followed by the same activation in PyTorch."""
    if not glu_epilogue_takes(x, out_features, in_features):
        return glu_from_interleaved(ortho_linear_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha,
                                                      bits, group_size, out_features, in_features))
    x2, scales, zeros, values, bias = _operands(x, scales, zeros, values, bias, in_features)
    y = _checked(_state["ext"].fused_small_m_glu(x2, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha,
                                                 bits, group_size, out_features, in_features,
                                                 pdl_mode(x2.shape[0])), "fused kernel (GLU epilogue)")
    return y.reshape(*x.shape[:-1], out_features // 2)


ortho_glu.register_kernel("cuda")(ortho_glu_cuda)


NORM_NOT_TAKEN = -2  # binding.cpp kNotTaken


def norm_epilogue_takes(x, out_features: int, in_features: int) -> bool:
    """Whether v1's epilogue does the RMSNorm's work (libortho.norms): v1 at M 1-16, fp16 / bf16, whole 16-row tiles
    and 16-column tiles of partial sums."""
    return glu_epilogue_takes(x, out_features, in_features) and in_features % 16 == 0


def _norm_call(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features,
               in_features, residual, norm_weight, part, eps, glu, what):
    """The binding's result, or None where the call's v1 configuration has no norm form (a table set for tuning)."""
    x2, scales, zeros, values, bias = _operands(x, scales, zeros, values, bias, in_features)
    result = _state["ext"].fused_small_m_norm(x2, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits,
                                              group_size, out_features, in_features, pdl_mode(x2.shape[0]), residual,
                                              norm_weight, part, eps, glu)
    return None if result[1] == NORM_NOT_TAKEN else _checked(result, what)


def ortho_linear_add_norm_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                               out_features, in_features, residual, norm_weight):
    """libortho::ortho_linear_add_norm: v1's epilogue adds the residual and writes g * h and the sums of squares where
    it runs (norm_epilogue_takes), else the op's product and the same steps in PyTorch."""
    lead = x.shape[:-1]
    if not norm_epilogue_takes(x, out_features, in_features):
        y = ortho_linear_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                              out_features, in_features)
        return add_norm_reference(y, residual, norm_weight)
    m = x.numel() // in_features
    part = torch.empty(m, out_features // NORM_TILE, dtype=torch.float32, device=x.device)
    hg = _norm_call(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features,
                    in_features, residual.reshape(m, out_features).contiguous(), norm_weight.contiguous(), part, 0.0,
                    False, "fused kernel (add-norm epilogue)")
    if hg is None:
        return add_norm_reference(ortho_linear_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha,
                                                    bits, group_size, out_features, in_features), residual, norm_weight)
    return hg.reshape(2, *lead, out_features), part.reshape(*lead, out_features // NORM_TILE)


def _rms_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features,
              in_features, part, eps, glu):
    y = None
    if norm_epilogue_takes(x, out_features, in_features):
        m = x.numel() // in_features
        y = _norm_call(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                       out_features, in_features, None, None, part.reshape(m, -1).contiguous(), eps, glu,
                       "fused kernel (rms epilogue)")
    if y is not None:
        return y.reshape(*x.shape[:-1], out_features // 2 if glu else out_features)
    # the product, then r and the bias in PyTorch
    y = rms_finish(ortho_linear_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, None, alpha, bits,
                                     group_size, out_features, in_features), part, eps, bias, x.dtype)
    return glu_from_interleaved(y) if glu else y


def ortho_linear_rms_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                          out_features, in_features, part, eps):
    """libortho::ortho_linear_rms: v1's epilogue scales its sums by the RMS from part (norm_epilogue_takes), else the
    op's product scaled in PyTorch (one more rounding)."""
    return _rms_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features,
                     in_features, part, eps, False)


def ortho_glu_rms_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size,
                       out_features, in_features, part, eps):
    """libortho::ortho_glu_rms: as ortho_linear_rms_cuda, with the GLU activation (v1's epilogue or PyTorch)."""
    return _rms_cuda(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, out_features,
                     in_features, part, eps, True)


ortho_linear_add_norm.register_kernel("cuda")(ortho_linear_add_norm_cuda)
ortho_linear_rms.register_kernel("cuda")(ortho_linear_rms_cuda)
ortho_glu_rms.register_kernel("cuda")(ortho_glu_rms_cuda)
