"""End-to-end greedy decode speed: bf16 vs LibOrtho (alpha = 1 and 0) vs torch's int4, one harness.

Protocol (the same for every row): the model's target linears (every linear of the decoder blocks)
are bf16 ``nn.Linear`` (baseline), ``OrthoLinear`` (INT4 g128 RTN base + 1 % ortho stream, run at
alpha = 1 and alpha = 0) or a wrapper of torch's tinygemm int4 kernel (``aten._weight_int4pack_mm``,
asymmetric INT4, bf16 scale+zero). Embeddings, norms and the lm_head stay bf16 in every row (``--targets``
converts other linears, e.g. an untied lm_head). The LibOrtho rows run q/k/v as one launch (``libortho.fuse_siblings``)
and gate/up as one GLU layer whose kernel writes silu(gate) * up (``libortho.fuse_glu``; ``--no-glu``: one launch
of siblings; ``--no-fuse`` keeps all apart); the bf16 and int4 rows run the model's own separate linears. Attention,
the same in every row: on a GPU LibOrtho's attention step op in the one-token steps (``libortho.attention``; the
prefill stays SDPA),
on the CPU transformers' SDPA (``--attn sdpa`` / ``libortho`` choose). ``--coordinate-descent``: inductor tunes its
Triton kernels (norms, rotary, elementwise) by coordinate descent in every row's compile.
A prompt of ``prompt_len`` tokens per sequence is prefilled (eager) into a transformers ``StaticCache`` whose layers
share one length, advanced once a forward (``libortho.static_cache``; ``--per-layer-length``: transformers' cache as
it is, each layer adding to its own); then ``new_tokens - 1`` one-token greedy decode steps run, each one a replay of a
CUDA graph captured from the step (``--mode graph``: the eager step; ``--mode compile``: the
``torch.compile(fullgraph=True)`` step) that reads the current token from a static buffer, writes
the argmax token back into it and advances the cache on the device: no host-device
synchronization between tokens. The whole decode is timed with CUDA events after one warm-up
repetition; medians over the repetitions are reported. tokens/s counts the tokens of the whole
batch (batch x steps / time); ms/token is the time of one decode step. Prefill: a separate
``prefill_len``-token prompt at batch 1 (eager, CUDA events, median). Peak memory:
``torch.cuda.max_memory_allocated`` after a reset with only that row's model resident (weights,
KV cache, graph pool). Weight bytes: the stored bytes of the target linears.

The shared decode path (:class:`StaticDecoder`) is also what ``libortho generate --compile`` uses.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..attention import CHOICES as ATTENTIONS
from ..attention import resolve as resolve_attention
from ..attention import use_attention_step, use_decode_attention
from ..static_cache import plain_cache, shared_length_cache

VARIANTS = ("bf16", "alpha1", "alpha0", "int4", "bf16_fused")
DEFAULT_VARIANTS = VARIANTS[:4]  # bf16_fused (the control for what fusing siblings alone is worth) on request
MODELS = ("smollm2", "llama2-7b-shape", "tiny")
LABELS = {"bf16": "bf16", "alpha1": "LibOrtho alpha=1", "alpha0": "LibOrtho alpha=0", "int4": "torch int4",
          "bf16_fused": "bf16, q/k/v and gate/up fused"}
_PAD = 8  # spare cache slots / token slots for the warm-up steps before a graph capture


# ------------------------------------------------------------------------------------------------
# The decode path: static KV cache, one-token step on static buffers, CUDA graph or torch.compile
# ------------------------------------------------------------------------------------------------

_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream(device) -> "torch.cuda.Stream":
    """One side stream per device for the warm-up before each capture. cuBLAS keeps a workspace for every stream it
    has run on (32 MiB on an H200) until the process ends or it is cleared, so a new stream per decoder grew the
    memory by that much with every fast generate (benchmarks/probes/decode_peak_mem.py)."""
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[idx] = torch.cuda.Stream(idx)
    return _WARMUP_STREAMS[idx]


def _forward_params(model) -> set:
    return set(inspect.signature(model.forward).parameters)


@contextlib.contextmanager
def backend(name: str | None):
    """``with backend("reference"):`` forces LibOrtho's pure-PyTorch op (read at call / capture time)."""
    saved = os.environ.get("LIBORTHO_BACKEND")
    if name is None:
        os.environ.pop("LIBORTHO_BACKEND", None)
    else:
        os.environ["LIBORTHO_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LIBORTHO_BACKEND", None)
        else:
            os.environ["LIBORTHO_BACKEND"] = saved


def _raise_recompile_limit(limit: int = 256) -> None:
    """Every decoder (one per variant, batch and alpha) compiles its own step; past torch's default
    limit of 8 recompilations Dynamo would silently run the rest eagerly."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key) and getattr(cfg, key) < limit:
            setattr(cfg, key, limit)


def inductor_tuning(coordinate_descent: bool, pdl: bool = False):
    """A context in which torch.compile's inductor tunes (or not) each Triton kernel it generates by coordinate
    descent over block sizes and warps, and (``pdl``) launches them with programmatic dependent launch (Hopper:
    a kernel may start while the one before it drains, waiting on the device before it reads that kernel's
    output); compiles inside it (they happen at a decoder's first steps) keep it."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch({"coordinate_descent_tuning": bool(coordinate_descent), **_pdl_patch(pdl)})


def inductor_pdl(on: bool):
    """A context with inductor's PDL on (``libortho generate --inductor-pdl``); off: inductor's settings as they are."""
    import torch._inductor.config as inductor_config
    return inductor_config.patch(_pdl_patch(True)) if on else contextlib.nullcontext()


def _pdl_patch(on: bool) -> dict:
    """inductor's PDL option set to ``on`` where this torch has it; asking for it where it has not exits."""
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.triton, "enable_pdl"):
        if on:
            raise SystemExit(f"--inductor-pdl: torch {torch.__version__}'s inductor has no triton.enable_pdl option")
        return {}
    return {"triton.enable_pdl": bool(on)}


class StaticDecoder:
    """Greedy decoding with a static KV cache and a one-token step that never syncs with the host.

    ``mode``: ``"eager"`` (plain calls), ``"graph"`` (CUDA only: the eager step captured once in a CUDA
    graph and replayed), ``"compile"`` (``torch.compile(step, fullgraph=True)``; on CUDA also captured
    in a CUDA graph) or ``"reduce-overhead"`` (``torch.compile(step, mode="reduce-overhead",
    fullgraph=True)``: torch's own CUDA graph trees).

    The step reads the current tokens from ``self.cur`` (B, 1), writes the argmax into ``self.tokens``
    at the device-side counter ``self.pos`` (and the logits into ``self.logits`` when ``keep_logits``),
    copies it back into ``self.cur`` and advances the counter. The cache's layers share one device-side length,
    advanced once per forward (``libortho.static_cache``; ``shared_length=False``: transformers' StaticCache, each
    layer advancing its own). A graph captures the model's alpha values (they are arguments of the kernel launches):
    make a new decoder after changing alpha.
    """

    MODES = ("eager", "graph", "compile", "reduce-overhead")

    def __init__(self, model, batch: int, max_new_tokens: int, prompt_len: int, mode: str = "eager",
                 keep_logits: bool = False, warmup_steps: int = 2, shared_length: bool = True):
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r}; expected one of {self.MODES}")
        p = next(model.parameters())
        self.device = p.device
        if mode == "graph" and self.device.type != "cuda":
            raise ValueError("mode='graph' needs the model on a CUDA device (use 'eager' or 'compile')")
        self.model, self.batch, self.mode = model, int(batch), mode
        self.max_new_tokens, self.prompt_len = int(max_new_tokens), int(prompt_len)
        self.warmup_steps = warmup_steps
        make_cache = shared_length_cache if shared_length else plain_cache
        self.cache = make_cache(model, batch, self.prompt_len + self.max_new_tokens + _PAD)
        self._length = getattr(self.cache, "length", None)  # None: the layers advance their own
        self.cache.causal_only = True  # no padding mask is ever passed (libortho.attention.step_takes)
        params = _forward_params(model)
        self._kw = {("cache" if "cache" in params else "past_key_values"): self.cache, "use_cache": True}
        if "logits_to_keep" in params:
            self._kw["logits_to_keep"] = 1
        width = self.max_new_tokens + _PAD
        self.cur = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        head = model.get_output_embeddings()  # an nn.Linear, or an OrthoLinear (bench decode --targets)
        vocab = getattr(head, "out_features", None) or model.config.vocab_size
        self.logits = (torch.zeros(batch, width, vocab, dtype=torch.float32, device=self.device)
                       if keep_logits else None)
        self.graph = None
        self._fn = self._step
        if mode in ("compile", "reduce-overhead"):
            _raise_recompile_limit()
        if mode == "compile":
            self._fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        elif mode == "reduce-overhead":
            for t in (self.cur, self.tokens, self.pos) + ((self.logits,) if keep_logits else ()):
                torch._dynamo.mark_static_address(t)
            self._fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)

    # -- the two forwards ---------------------------------------------------------------------------
    def _write(self, logits: torch.Tensor) -> None:
        nxt = logits.argmax(-1)
        self.tokens.index_copy_(1, self.pos, nxt[:, None])
        if self.logits is not None:
            self.logits.index_copy_(1, self.pos, logits.float()[:, None])
        self.cur.copy_(nxt[:, None])
        self.pos.add_(1)

    def _advance(self, n: int) -> None:
        if self._length is not None:
            self._length.add_(n)

    def _step(self) -> None:
        out = self.model(input_ids=self.cur, **self._kw)
        self._advance(1)
        self._write(out.logits[:, -1, :])

    @torch.no_grad()
    def reset(self) -> None:
        self.cache.reset()
        self.pos.zero_()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, reset: bool = True) -> None:
        """(Reset and) run the prompt (B, P) through the cache and write the first new token."""
        if ids.shape[0] != self.batch or ids.shape[1] > self.prompt_len:
            raise ValueError(f"prompt of shape {tuple(ids.shape)} does not fit this decoder "
                             f"(batch {self.batch}, prompt_len <= {self.prompt_len})")
        if reset:
            self.reset()
        out = self.model(input_ids=ids.to(self.device), **self._kw)
        self._advance(ids.shape[1])
        self._write(out.logits[:, -1, :])

    @torch.no_grad()
    def prepare(self, ids: torch.Tensor) -> None:
        """Compile / capture the step (needs one prefill: the cache allocates lazily). Idempotent."""
        if self.graph is not None or self.mode == "eager":
            return
        self.prefill(ids)
        if self.device.type == "cuda" and self.mode in ("graph", "compile"):
            stream = _warmup_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up (compilation, lazy init, cuBLAS handles) off the graph:
                for _ in range(max(1, self.warmup_steps)):  # at least once, none of them may run under capture
                    self._fn()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._fn()
            self.graph = graph
        else:  # compile on CPU, or reduce-overhead: compile (and record) now, not in the timed loop
            for _ in range(self.warmup_steps + 1):
                self._fn()
            self.graph = "compiled"
        self.reset()

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """``steps`` one-token steps after a prefill; no host-device synchronization."""
        if steps > self.max_new_tokens - 1:
            raise ValueError(f"at most {self.max_new_tokens - 1} decode steps after the prefill, asked {steps}")
        if isinstance(self.graph, torch.cuda.CUDAGraph):
            for _ in range(steps):
                self.graph.replay()
        else:
            for _ in range(steps):
                self._fn()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int | None = None) -> torch.Tensor:
        """Greedy tokens (B, n) after the prompt, n = max_new_tokens (no early stop at EOS)."""
        n = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        self.prepare(ids)
        self.prefill(ids)
        self.decode(n - 1)
        return self.tokens[:, :n].clone()

    def step_logits(self, n: int) -> torch.Tensor:
        """(B, n, V) fp32 logits of the last generate (``keep_logits=True``)."""
        if self.logits is None:
            raise ValueError("construct the decoder with keep_logits=True")
        return self.logits[:, :n]


def generate_fast(model, ids: torch.Tensor, max_new_tokens: int, mode: str | None = None,
                  eos_token_id=None) -> list[torch.Tensor]:
    """Greedy generation on the fast path; returns each sequence's new tokens, cut after the first EOS."""
    dev = next(model.parameters()).device
    mode = mode or ("graph" if dev.type == "cuda" else "eager")
    dec = StaticDecoder(model, ids.shape[0], max_new_tokens, ids.shape[1], mode=mode)
    toks = dec.generate(ids.to(dev), max_new_tokens).cpu()
    eos = set() if eos_token_id is None else (
        {int(e) for e in eos_token_id} if isinstance(eos_token_id, (list, tuple)) else {int(eos_token_id)})
    out = []
    for row in toks:
        cut = next((i + 1 for i, t in enumerate(row.tolist()) if t in eos), len(row))
        out.append(row[:cut])
    return out


# ------------------------------------------------------------------------------------------------
# torch's int4 weight-only linear (tinygemm), the comparison row
# ------------------------------------------------------------------------------------------------

def tinygemm_quantize(w: torch.Tensor, group_size: int):
    """Asymmetric INT4 per group along K in tinygemm's convention ``w ~ (q - 8) * scale + zero``.

    Returns codes (N, K) int32 in [0, 15] and scale, zero (N, G) fp32 (already rounded to bf16)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    scale = ((wmax - wmin) / 15).clamp_min(1e-6).to(torch.bfloat16).float()
    zero = (wmin + 8 * scale).to(torch.bfloat16).float()
    q = torch.clamp(torch.round((wg - (zero - 8 * scale)[..., None]) / scale[..., None]), 0, 15)
    return q.reshape(n, k).to(torch.int32), scale, zero


def _int4_group_size(k: int, preferred: int) -> int:
    for g in (preferred, 128, 64, 32):
        if g <= k and k % g == 0:
            return g
    raise ValueError(f"torch int4: in_features={k} is not a multiple of 32")


def _inner_k_tiles(k: int) -> int:
    for t in (8, 4, 2):
        if k % (16 * t) == 0:
            return t
    raise ValueError(f"torch int4: in_features={k} is not a multiple of 32")


class Int4WeightOnlyLinear(nn.Module):
    """``nn.Linear`` replacement through torch's int4 weight-only kernel (CUDA: tinygemm
    ``aten._weight_int4pack_mm``; CPU: ``aten._weight_int4pack_mm_for_cpu``). bf16 activations."""

    def __init__(self, packed, scale_zero, in_features, out_features, group_size, bias=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    group_size: int = 128) -> "Int4WeightOnlyLinear":
        n, k = weight.shape
        if n % 8:
            raise ValueError(f"torch int4: out_features={n} is not a multiple of 8")
        g = _int4_group_size(k, group_size)
        tiles = _inner_k_tiles(k)
        q, scale, zero = tinygemm_quantize(weight, g)
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (G, N, 2)
        if weight.is_cuda:
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), tiles)
        b = None if bias is None else bias.detach().to(torch.bfloat16)
        return cls(packed, sz, k, n, g, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.packed, self.group_size, self.scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                           self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_zero, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def llama2_7b_config(**over):
    from transformers import LlamaConfig
    kw = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(over)
    return LlamaConfig(**kw)


def tiny_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def random_llama(config, device, dtype=torch.bfloat16, seed: int = 0):
    """A LlamaForCausalLM built directly on ``device`` in ``dtype``, random N(0, 0.02) weights."""
    from transformers import LlamaForCausalLM
    config._attn_implementation = "sdpa"
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model.eval()  # built in dtype; rotary inv_freq stays fp32 as from_pretrained keeps it


def load_bench_model(name: str, device):
    """(model in bf16 on device, tokenizer or None, description)."""
    if name == "smollm2":
        from ..data import load_model
        model, tok = load_model("smollm2", dtype=torch.bfloat16)
        return model.to(device).eval(), tok, "SmolLM2-135M-Instruct (GGUF Q4_1 weights, run in bf16)"
    if name == "llama2-7b-shape":
        return (random_llama(llama2_7b_config(), device), None,
                "Llama-2-7B shape (LlamaConfig hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000), "
                "random N(0, 0.02) weights")
    if name == "tiny":
        return random_llama(tiny_config(), device), None, "tiny random Llama (hidden 128, 2 layers, vocab 256)"
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def _prompt_text() -> str:
    from ..data import DATA_DIR
    f = DATA_DIR / "text" / "austen-prideprejudice.txt"
    if f.is_file():
        return f.read_text(encoding="utf-8")[:200_000]
    base = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
            "in want of a wife. However little known the feelings or views of such a man may be on his first "
            "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
            "that he is considered the rightful property of some one or other of their daughters. ")
    return base * 200


def make_prompts(tok, vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids: distinct windows of real text when a tokenizer is given, else random ids."""
    if tok is not None:
        from ..data import tokenize
        ids = tokenize(tok, _prompt_text())
        need = batch * length
        if ids.numel() < need:
            ids = ids.repeat(math.ceil(need / ids.numel()))
        return ids[:need].reshape(batch, length)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


# ------------------------------------------------------------------------------------------------
# Swapping the target linears
# ------------------------------------------------------------------------------------------------

class LinearBank:
    """The target linears' bf16 weights kept on the CPU, so that only one variant is on the device."""

    def __init__(self, model, progress: bool = True, pattern: str | None = None):
        from tqdm.auto import tqdm

        from ..surgery import find_targets, linear_weight
        self.model = model
        self.names, self.weights, self.biases = [], {}, {}
        for name, lin in tqdm(find_targets(model, pattern), desc="stash linears to CPU", disable=not progress):
            self.names.append(name)
            self.weights[name] = linear_weight(lin).to("cpu", torch.bfloat16)
            self.biases[name] = None if lin.bias is None else lin.bias.detach().to("cpu", torch.bfloat16)
        self.device = next(model.parameters()).device
        self.clear()

    def clear(self) -> None:
        from ..surgery import set_module
        for name in self.names:
            set_module(self.model, name, nn.Identity())
        _free(self.device)

    def install(self, make, desc: str, progress: bool = True) -> float:
        """Replace every target with ``make(weight_on_device, bias_on_device)``; returns seconds."""
        from tqdm.auto import tqdm

        from ..surgery import set_module
        self.clear()
        _sync(self.device)
        t = time.perf_counter()
        for name in tqdm(self.names, desc=desc, disable=not progress):
            w = self.weights[name].to(self.device)
            b = None if self.biases[name] is None else self.biases[name].to(self.device)
            set_module(self.model, name, make(w, b))
            del w, b
        _sync(self.device)
        return time.perf_counter() - t


def _bf16_linear(w, b):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _ortho_maker(config):
    from ..split import split_linear

    def make(w, b):
        return split_linear(w, b, config).to(torch.bfloat16)
    return make


def _linear_bytes(m) -> int:
    from ..layer import OrthoLinear
    if isinstance(m, OrthoLinear):
        s = m.storage_bytes()
        return s["base"] + s["scales"] + s["zeros"] + s["ortho"] + s["bias"]
    if isinstance(m, Int4WeightOnlyLinear):
        return m.storage_bytes()
    return sum(p.numel() * p.element_size() for p in m.parameters()) if isinstance(m, nn.Linear) else 0


def target_bytes(model, names: list[str] | None = None) -> int:
    """Bytes of the linears ``names`` (default: every linear but the output embedding), in whatever form they are."""
    if names is not None:
        return sum(_linear_bytes(model.get_submodule(n)) for n in names)
    return sum(_linear_bytes(m) for m in model.modules() if m is not model.get_output_embeddings())


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        # cuBLAS keeps a workspace per (handle, stream) it has run on (32 MiB on an H200): the warm-up stream's, the
        # capture stream's, stream 0's; cleared so that each row's peak counts only its own (before, the next row's
        # peak counted them: benchmarks/probes/decode_peak_mem.py). Only here, where no captured graph is alive,
        # since a live one may still point into them.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


class _Timer:
    """Milliseconds of a region: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self.t0)


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def measure_decode(model, prompts: torch.Tensor, new_tokens: int, mode: str, reps: int, warmup: int,
                   progress: bool = True, desc: str = "decode", shared_length: bool = True) -> dict:
    """Median decode timing of ``new_tokens - 1`` graph-replayed steps after an eager prefill."""
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    _free(device)
    _reset_peak(device)
    batch, plen = prompts.shape
    ids = prompts.to(device)
    t = time.perf_counter()
    dec = StaticDecoder(model, batch, new_tokens, plen, mode=mode, shared_length=shared_length)
    dec.prepare(ids)
    _sync(device)
    prepare_s = time.perf_counter() - t
    steps = new_tokens - 1
    dec_ms, pre_ms, first = [], [], None
    deterministic = True
    for r in tqdm(range(warmup + reps), desc=desc, disable=not progress, leave=False):
        dec.reset()
        _sync(device)
        with _Timer(device) as tp:
            dec.prefill(ids, reset=False)
        with _Timer(device) as td:
            dec.decode(steps)
        if r >= warmup:
            dec_ms.append(td.ms)
            pre_ms.append(tp.ms)
        toks = dec.tokens[:, :new_tokens].clone()
        if first is None:
            first = toks
        elif not torch.equal(first, toks):
            deterministic = False
    med = statistics.median(dec_ms)
    out = {"tok_s": batch * steps / (med / 1e3), "ms_per_token": med / steps, "decode_ms": med,
           "decode_ms_all": dec_ms, "prefill_prompt_ms": statistics.median(pre_ms),
           "peak_mem_bytes": _peak(device), "prepare_s": prepare_s, "deterministic": deterministic,
           "tokens": first.cpu()}
    del dec
    _free(device)
    return out


@torch.no_grad()
def measure_prefill(model, ids: torch.Tensor, reps: int, warmup: int) -> dict:
    """Eager prefill of a (1, L) prompt into a static cache, median ms."""
    device = next(model.parameters()).device
    _free(device)
    _reset_peak(device)
    cache = plain_cache(model, ids.shape[0], ids.shape[1])
    params = _forward_params(model)
    kw = {("cache" if "cache" in params else "past_key_values"): cache, "use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    ids = ids.to(device)
    times = []
    for r in range(warmup + reps):
        cache.reset()
        _sync(device)
        with _Timer(device) as t:
            model(input_ids=ids, **kw)
        if r >= warmup:
            times.append(t.ms)
    out = {"ms": statistics.median(times), "ms_all": times, "peak_mem_bytes": _peak(device),
           "tok_s": ids.numel() / (statistics.median(times) / 1e3)}
    del cache
    _free(device)
    return out


def compare_greedy(model, ids: torch.Tensor, n: int, mode: str, eager_cap: int = 64) -> dict:
    """Greedy tokens and logits of the default dispatch (the CUDA kernels on a GPU) vs the reference op.

    ``first_divergence``: the first step whose token differs (None: identical). The logits are compared
    over the steps up to and including it (both conditioned on the same tokens there). Where ``mode``
    fails (e.g. a graph capture), that side runs eagerly for at most ``eager_cap`` tokens (said in a note)."""
    out = {"mode": mode}
    runs = {}
    for key, name in (("dispatch", None), ("reference", "reference")):
        with backend(name):
            used, m = mode, n
            try:
                dec = StaticDecoder(model, ids.shape[0], m, ids.shape[1], mode=mode, keep_logits=True)
                toks = dec.generate(ids, m)
            except Exception as e:  # noqa: BLE001  (e.g. a capture failure): say so, run eagerly
                used, m = "eager", n if mode == "eager" else min(n, eager_cap)
                out[f"{key}_note"] = f"{mode} failed ({type(e).__name__}: {e}); ran eagerly for {m} tokens"
                _free(ids.device)
                dec = StaticDecoder(model, ids.shape[0], m, ids.shape[1], mode="eager", keep_logits=True)
                toks = dec.generate(ids, m)
            runs[key] = (toks.cpu(), dec.step_logits(m).cpu())
            out[f"{key}_mode"] = used
            del dec
            _free(ids.device)
    (ta, la), (tb, lb) = runs["dispatch"], runs["reference"]
    n = min(ta.shape[1], tb.shape[1])
    ta, la, tb, lb = ta[:, :n], la[:, :n], tb[:, :n], lb[:, :n]
    out["tokens"] = n
    diff_pos = (ta != tb).any(0).nonzero()
    first = None if diff_pos.numel() == 0 else int(diff_pos[0])
    upto = n if first is None else first + 1
    d = (la[:, :upto] - lb[:, :upto]).abs()
    scale = lb[:, :upto].abs().amax().item()
    out.update({"identical": first is None, "first_divergence": first,
                "max_abs_logit_diff": d.max().item(), "max_abs_logit": scale,
                "bf16_half_ulp_at_max_logit": scale * 2.0 ** -8,
                "tokens_dispatch": ta[0].tolist(), "tokens_reference": tb[0].tolist()})
    if first is not None:
        top = lb[0, first].topk(2).values
        out["reference_top2_margin_at_divergence"] = (top[0] - top[1]).item()
        out["logit_diff_at_divergence"] = d[0, first].max().item()
    return out


@contextlib.contextmanager
def dense_bf16_linears(model):
    """Every OrthoLinear runs as a plain ``F.linear`` with the dense weight deq(Q) + alpha * S rounded to
    the activation dtype: what any correct bf16 implementation of the same layer may compute. Its distance
    from the fp32 reference op is the bf16 noise floor that the CUDA kernels are judged against."""
    from ..glu import OrthoGLU
    from ..model import ortho_layers
    from ..ops.reference import glu_from_interleaved
    layers = ortho_layers(model)
    dt = model.get_input_embeddings().weight.dtype  # the activation dtype
    for _, m in layers:
        w, b = m.dense_weight().to(dt), None if m.bias is None else m.bias.to(dt)
        m.forward = lambda x, w=w, b=b: nn.functional.linear(x, w, b)
        if isinstance(m, OrthoGLU):  # its rows are gate's and up's interleaved, its output silu(gate) * up
            m.forward = lambda x, w=w, b=b: glu_from_interleaved(nn.functional.linear(x, w, b))
    try:
        yield
    finally:
        for _, m in layers:
            del m.forward


def teacher_forced_logits(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (steps, vocab) in fp32 of ``seq`` (1, T): the prompt in one forward (the large-M path), then one
    token per forward (the decode kernels), eager with a dynamic cache; every variant sees the same tokens."""
    from transformers import DynamicCache
    cache = DynamicCache()
    out = [model(input_ids=seq[:, :prompt_len], past_key_values=cache, use_cache=True).logits[:, -1]]
    for t in range(prompt_len, seq.shape[1] - 1):
        out.append(model(input_ids=seq[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.cat(out).float()


def compare_teacher_forced(model, prompt: torch.Tensor, tokens: list[int]) -> dict:
    """The CUDA op (default dispatch) and a dense bf16 F.linear, each against the fp32 reference op, on the
    same token sequence (prompt + ``tokens``): max and mean |logit difference| and top-1 agreement per step.
    The CUDA op agrees "to the bf16 level" when its distance is of the size of the dense bf16 one."""
    seq = torch.cat([prompt[:1], torch.tensor([tokens], device=prompt.device, dtype=prompt.dtype)], 1)
    p = prompt.shape[1]
    with backend("reference"):
        ref = teacher_forced_logits(model, seq, p)
    with backend(None):
        cuda = teacher_forced_logits(model, seq, p)
    with dense_bf16_linears(model):
        dense = teacher_forced_logits(model, seq, p)
    out = {"steps": ref.shape[0], "max_abs_logit": ref.abs().max().item()}
    for key, y in (("cuda", cuda), ("dense_bf16", dense)):
        d = (y - ref).abs()
        out[key] = {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
                    "top1_agreement": (y.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    return out


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("--models", nargs="+", default=["smollm2", "llama2-7b-shape"], choices=MODELS,
                   help="one invocation per model is fine; 'tiny' is the CPU smoke test")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prefill-len", type=int, default=2048, help="batch-1 prefill prompt (0: skip)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                   help="bf16_fused: bf16 with q/k/v and gate/up as one F.linear each (libortho.fuse_linear_siblings), "
                        "the control for the LibOrtho rows' fusion")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--score", default="magnitude", choices=["magnitude", "random"],
                   help="ortho sieve of the RTN residual (random draws its scores on the CPU: slow for 7B)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-fuse", action="store_true",
                   help="LibOrtho rows: keep q/k/v and gate/up as separate launches (default: one launch each, "
                        "libortho.fuse_siblings)")
    p.add_argument("--glu", action=argparse.BooleanOptionalAction, default=True,
                   help="LibOrtho rows: gate_proj and up_proj as one layer whose kernel writes silu(gate) * up "
                        "(libortho.fuse_glu; then q/k/v fused as siblings), no activation kernel (default; "
                        "--no-glu or --no-fuse: gate and up apart)")
    p.add_argument("--norms", action="store_true",
                   help="LibOrtho rows: each layer's RMSNorms and residual adds in its products' epilogues during the "
                        "decode steps (libortho.fuse_norms; needs the step op, the GLU layer and fused q/k/v)")
    p.add_argument("--targets", default=None,
                   help="regex of the linears the LibOrtho and torch int4 rows convert (default: every linear of the "
                        "decoder blocks); e.g. 'layers|lm_head' adds an untied lm_head (a tied one is refused); the "
                        "bf16 rows run the model as it is, their bytes count the same linears")
    p.add_argument("--mode", default=None, choices=StaticDecoder.MODES,
                   help="decode step: graph (default on CUDA), compile, reduce-overhead, eager (default on CPU)")
    p.add_argument("--attn", default="auto", choices=ATTENTIONS,
                   help="attention of every row (the same for all): transformers' SDPA, or LibOrtho's decode attention "
                        "for the one-token steps (libortho.attention; prefill stays SDPA); libortho-step: that, with the "
                        "rotary embedding and the cache writes inside its op (use_attention_step); auto: libortho-step "
                        "where the kernel takes the model (the fastest end to end on an H200), else sdpa")
    p.add_argument("--per-layer-length", action="store_true",
                   help="transformers' StaticCache as it is, each layer advancing its own length (default: one length "
                        "shared by the layers, advanced once a step; libortho.static_cache), every row alike")
    p.add_argument("--inductor-pdl", action="store_true",
                   help="compile modes: inductor launches its Triton kernels with programmatic dependent launch "
                        "(Hopper), every row alike; with LIBORTHO_PDL=1 LibOrtho's decode kernel takes part too")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="compile modes: inductor tunes each of its Triton kernels by coordinate descent (gpt-fast's "
                        "setting; longer compiles), every row alike")
    p.add_argument("--check-tokens", type=int, default=None,
                   help="greedy check reference vs CUDA op on smollm2 (default: --new-tokens; 0: skip)")
    p.add_argument("--strict", action="store_true", help="stop at the first failing row instead of recording it")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode-<card>.json)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge results of separate invocations (e.g. one per model) into --out")


def card_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")
    return "cpu"


@contextlib.contextmanager
def _keep_going(info: dict, key: str, what: str, strict: bool, device):
    """Run the body; a failure is recorded in ``info["errors"][key]`` and printed, and the benchmark goes on
    with the next measurement (``--strict`` re-raises instead)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        info["errors"][key] = f"{type(e).__name__}: {e}"
        print(f"  {what}: FAILED {type(e).__name__}: {e}", flush=True)
        _free(device)


def bench_model(name: str, args, device, on_measured=None) -> tuple[list[dict], dict]:
    """Rows and info of one model; ``on_measured(rows, info)`` gets what is measured so far after each batch row,
    prefill and greedy check (run() keeps it in a partial file, so a run cut off by a time limit loses only the
    measurement it was in)."""
    from ..config import OrthoConfig
    from ..fuse import fuse_linear_siblings, fuse_siblings, unfuse_siblings
    from ..glu import fuse_glu, unfuse_glu
    from ..model import ortho_layers, report, set_alpha
    from ..norms import fuse_norms, unfuse_norms
    from ..surgery import find_targets
    progress = not args.no_progress
    mode = args.mode or ("graph" if device.type == "cuda" else "eager")
    t0 = time.perf_counter()
    model, tok, desc = load_bench_model(name, device)
    attn = resolve_attention(args.attn, model, device)  # auto: LibOrtho's where its kernel takes this model
    if attn in ("libortho", "libortho-step"):
        use_decode_attention(model)
    if attn == "libortho-step":
        use_attention_step(model)  # the rotary embedding and the cache writes inside the attention op
    info = {"description": desc, "load_s": time.perf_counter() - t0, "mode": mode, "errors": {},
            "params": sum(p.numel() for p in model.parameters()), "attention": attn}
    vocab = model.config.vocab_size
    prompts = make_prompts(tok, vocab, max(args.batches), args.prompt_len)
    prefill_ids = make_prompts(tok, vocab, 1, args.prefill_len, seed=1) if args.prefill_len else None
    results = {v: {} for v in VARIANTS}   # variant -> batch -> measure dict
    prefill = {}
    weight_bytes = {}

    def run_variant(v):
        print(f"[{name}] {LABELS[v]}", flush=True)
        for b in args.batches:
            with _keep_going(info, f"{v}/b{b}", f"batch {b}", args.strict, device):
                r = measure_decode(model, prompts[:b], args.new_tokens, mode, args.reps, args.warmup,
                                   progress, desc=f"{name} {v} b={b}", shared_length=not args.per_layer_length)
                results[v][b] = r
                print(f"  batch {b}: {r['tok_s']:9.1f} tok/s  {r['ms_per_token']:7.3f} ms/token  "
                      f"prefill({args.prompt_len}) {r['prefill_prompt_ms']:.2f} ms  peak "
                      f"{_gib(r['peak_mem_bytes'])}  (prepare {r['prepare_s']:.1f} s)", flush=True)
            measured()
        if prefill_ids is not None:
            with _keep_going(info, f"{v}/prefill", "prefill", args.strict, device):
                prefill[v] = measure_prefill(model, prefill_ids, args.reps, args.warmup)
                print(f"  prefill {args.prefill_len}: {prefill[v]['ms']:.2f} ms  peak "
                      f"{_gib(prefill[v]['peak_mem_bytes'])}", flush=True)
            measured()

    def measured():
        if on_measured is not None:
            on_measured(*snapshot())

    def snapshot() -> tuple[list[dict], dict]:
        info["weight_bytes"] = dict(weight_bytes)
        info["prefill"] = _prefill_info(args.prefill_len, prefill)
        return _rows(name, args, mode, results, prefill, weight_bytes), info

    targets = None if args.targets is None else [n for n, _ in find_targets(model, args.targets)]
    with torch.no_grad():
        if "bf16" in args.variants:
            weight_bytes["bf16"] = target_bytes(model, targets)
            run_variant("bf16")
        if "bf16_fused" in args.variants:
            weight_bytes["bf16_fused"] = target_bytes(model, targets)
            fuse_linear_siblings(model)
            run_variant("bf16_fused")
            unfuse_siblings(model)
        bank = LinearBank(model, progress, args.targets)
        if "bf16" not in weight_bytes:
            weight_bytes["bf16"] = sum(w.numel() * 2 for w in bank.weights.values()) + \
                sum(b.numel() * 2 for b in bank.biases.values() if b is not None)
        if {"alpha1", "alpha0"} & set(args.variants):
            cfg = OrthoConfig(bits=4, group_size=args.group_size, density=args.density, score=args.score,
                              method="rtn", dtype="bfloat16")
            info["libortho_config"] = cfg.to_dict()
            info["decompose_s"] = bank.install(_ortho_maker(cfg), f"{name}: decompose (RTN INT4, {args.score} "
                                               f"{100 * args.density:g} %)", progress)
            print(f"[{name}] decomposed in {info['decompose_s']:.1f} s", flush=True)
            info["glu_layers"] = len(fuse_glu(model)) if args.glu else 0
            info["fused_groups"] = 0 if args.no_fuse else len(fuse_siblings(model))
            info["norm_layers"] = len(fuse_norms(model)) if args.norms else 0
            if args.norms and not info["norm_layers"]:
                raise SystemExit(f"--norms: {name}'s layers cannot run their norms in the products (libortho.norms."
                                 "why_not_norms; they need --attn libortho-step, the GLU layer and fused q/k/v)")
            tot = report(model)["total"]
            weight_bytes["libortho"] = tot["bytes"] + sum(m.storage_bytes()["bias"] for _, m in ortho_layers(model))
            weight_bytes["libortho_base_only"] = tot["base_bytes"]
            info["libortho_bits_per_weight"] = tot["bits_per_weight"]
            info["libortho_ortho_nnz"] = tot["ortho_nnz"]
            check_n = args.new_tokens if args.check_tokens is None else args.check_tokens
            for v in [v for v in args.variants if v in ("alpha1", "alpha0")]:  # in the order asked
                a = 1.0 if v == "alpha1" else 0.0
                set_alpha(model, a)
                run_variant(v)
                if name == "smollm2" and check_n:
                    print(f"[{name}] greedy check at alpha={a:g}: default dispatch vs reference op", flush=True)
                    with _keep_going(info, f"{v}/greedy_check", "greedy check", args.strict, device):
                        c = compare_greedy(model, prompts[:1].to(device), check_n, mode)
                        info.setdefault("greedy_check", {})[v] = c
                        print(f"  identical={c['identical']} first_divergence={c['first_divergence']} "
                              f"max|dlogit| up to it={c['max_abs_logit_diff']:.4f} (bf16 half-ulp at the max "
                              f"logit {c['bf16_half_ulp_at_max_logit']:.4f})", flush=True)
                        tf = compare_teacher_forced(model, prompts[:1].to(device), c["tokens_dispatch"])
                        c["teacher_forced"] = tf
                        print(f"  teacher-forced over {tf['steps']} steps vs the fp32 reference op: CUDA op "
                              f"max|dlogit| {tf['cuda']['max_abs_logit_diff']:.4f} mean "
                              f"{tf['cuda']['mean_abs_logit_diff']:.4f} top-1 {tf['cuda']['top1_agreement']:.3f}; "
                              f"dense bf16 F.linear max {tf['dense_bf16']['max_abs_logit_diff']:.4f} mean "
                              f"{tf['dense_bf16']['mean_abs_logit_diff']:.4f} top-1 "
                              f"{tf['dense_bf16']['top1_agreement']:.3f}", flush=True)
                    measured()
            set_alpha(model, 1.0)
            unfuse_norms(model)
            unfuse_siblings(model)  # the groups hold the buffers: let the next variant free them
            unfuse_glu(model)  # gate_proj and up_proj back where the next variant installs its layers
        if "int4" in args.variants:
            with _keep_going(info, "int4", f"[{name}] torch int4", args.strict, device):
                info["int4_convert_s"] = bank.install(
                    lambda w, b: Int4WeightOnlyLinear.from_weight(w, b, args.group_size),
                    f"{name}: torch int4", progress)
                gs = sorted({m.group_size for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)})
                info["int4_group_sizes"] = gs
                weight_bytes["int4"] = target_bytes(model, targets)
                run_variant("int4")
        bank.clear()
    rows, info = snapshot()
    model = bank = None  # noqa: F841  (free the device before the next model)
    _free(device)
    return rows, info


def _prefill_info(tokens: int, prefill: dict) -> dict:
    return {"tokens": tokens, **{f"{v}_ms": p["ms"] for v, p in prefill.items()},
            **{f"{v}_ms_all": p["ms_all"] for v, p in prefill.items()},  # every rep: outliers show
            **{f"{v}_peak_mem_bytes": p["peak_mem_bytes"] for v, p in prefill.items()}}


def _rows(name: str, args, mode: str, results: dict, prefill: dict, weight_bytes: dict) -> list[dict]:
    """One row per batch from what is measured (variants not yet run: None)."""
    rows = []
    for b in args.batches:
        row = {"model": name, "batch": b, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "decode_steps": args.new_tokens - 1, "mode": mode}
        for v in VARIANTS:
            r = results[v].get(b)
            row[f"{v}_tok_s"] = None if r is None else r["tok_s"]
            row[f"{v}_ms_per_token"] = None if r is None else r["ms_per_token"]
            row[f"{v}_peak_mem_bytes"] = None if r is None else r["peak_mem_bytes"]
            row[f"{v}_prefill_{args.prompt_len}_ms"] = None if r is None else r["prefill_prompt_ms"]
            row[f"{v}_deterministic"] = None if r is None else r["deterministic"]
            row[f"{v}_weight_bytes"] = weight_bytes.get("libortho" if v.startswith("alpha") else v)
        base, fused = row["bf16_tok_s"], row["bf16_fused_tok_s"]
        for v in ("alpha1", "alpha0", "int4"):
            row[f"speedup_{v}"] = None if not base or row[f"{v}_tok_s"] is None else row[f"{v}_tok_s"] / base
            if fused and row[f"{v}_tok_s"] is not None:
                row[f"speedup_{v}_vs_bf16_fused"] = row[f"{v}_tok_s"] / fused
        if b == 1 and prefill:
            for v, p in prefill.items():
                row[f"{v}_prefill_{args.prefill_len}_ms"] = p["ms"]
        # greedy agreement of each row with bf16 (same prompt, same harness): how many leading tokens match
        ref = results["bf16"].get(b)
        for v in ("alpha1", "alpha0", "int4", "bf16_fused"):
            r = results[v].get(b)
            if ref is not None and r is not None:
                same = (ref["tokens"] == r["tokens"]).all(0).long()
                row[f"{v}_tokens_matching_bf16_prefix"] = int(same.cumprod(0).sum())
        rows.append(row)
    return rows


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def summary(result: dict) -> str:
    f = lambda x, fmt="{:.1f}": "-" if x is None else fmt.format(x)  # noqa: E731
    # a merged result may hold rows of several modes and runs: then each row names its mode, the header every date
    per_row = len({r.get("mode") for r in result["rows"]}) > 1
    proto = result["protocol"]
    mode = "per row (beside the model)" if per_row else proto["mode"]
    date = ", ".join(sorted(set(result.get("dates") or [result["date"]])))
    lines = [f"Decode, {result['card']}, torch {result['torch']}, transformers {result['transformers']}, "
             f"{date}; prompt {proto['prompt_len']} + {proto['new_tokens']} "
             f"new tokens, greedy, static cache (length {proto.get('cache_length', 'per layer')}), mode {mode}, "
             f"attention {proto.get('attention', 'sdpa')}"
             f"{', inductor coordinate-descent tuning' if proto.get('coordinate_descent') else ''}"
             f"{', inductor PDL' if proto.get('inductor_pdl') else ''}"
             f"{', LibOrtho gate / up as one GLU layer' if proto.get('glu') else ''}"
             f"{', LibOrtho norms in the products' if proto.get('norms') else ''}"
             f"{', converted linears ' + repr(proto['targets']) if proto.get('targets') else ''}"
             f"{', LibOrtho PDL ' + proto.get('pdl_mode', 'early') if proto.get('pdl') else ''}"
             f"{' up to M = ' + str(proto['pdl_max_m']) if proto.get('pdl') and proto.get('pdl_max_m') else ''}"
             ", median of "
             f"{proto['reps']}. tokens/s over the whole batch (ms per decode step).", "",
             "| model | batch | bf16 tok/s (ms) | LibOrtho alpha=1 | alpha=0 | torch int4 | speed-up a=1 / a=0 / int4 "
             "| peak GiB bf16 / a=1 / a=0 / int4 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cell = lambda v: "-" if r[f"{v}_tok_s"] is None else f"{r[f'{v}_tok_s']:.1f} ({r[f'{v}_ms_per_token']:.2f})"  # noqa: E731
        sp = " / ".join(f(r[f"speedup_{v}"], "{:.2f}x") for v in ("alpha1", "alpha0", "int4"))
        mem = " / ".join("-" if r[f"{v}_peak_mem_bytes"] is None else f"{r[f'{v}_peak_mem_bytes'] / 2**30:.2f}"
                         for v in DEFAULT_VARIANTS)
        name = f"{r['model']} ({r.get('mode')})" if per_row else r["model"]
        lines.append(f"| {name} | {r['batch']} | {cell('bf16')} | {cell('alpha1')} | {cell('alpha0')} | "
                     f"{cell('int4')} | {sp} | {mem} |")
    lines += ["", "| model | weight bytes of the linears: bf16 | LibOrtho (base + ortho) | base only | torch int4 "
              "| prefill ms (batch 1): bf16 / a=1 / a=0 / int4 | decompose s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, info in result["models"].items():
        wb = info.get("weight_bytes", {})
        mib = lambda k: "-" if wb.get(k) is None else f"{wb[k] / 2**20:.1f} MiB"  # noqa: E731
        pf = info.get("prefill", {})
        pre = " / ".join(f(pf.get(f"{v}_ms"), "{:.2f}") for v in DEFAULT_VARIANTS)
        lines.append(f"| {name} | {mib('bf16')} | {mib('libortho')} | {mib('libortho_base_only')} | {mib('int4')} | "
                     f"{pf.get('tokens')} tokens: {pre} | {f(info.get('decompose_s'))} |")
    for r in result["rows"]:
        if r.get("bf16_fused_tok_s") is not None:
            vs = " / ".join(f(r.get(f"speedup_{v}_vs_bf16_fused"), "{:.2f}x") for v in ("alpha1", "alpha0", "int4"))
            lines.append(f"\nControl, {r['model']} batch {r['batch']}: bf16 with q/k/v and gate/up fused "
                         f"{r['bf16_fused_tok_s']:.1f} tok/s ({r['bf16_fused_ms_per_token']:.2f} ms); alpha=1 / "
                         f"alpha=0 / int4 against it: {vs}")
    for name, info in result["models"].items():
        for v, c in info.get("greedy_check", {}).items():
            lines.append(f"\nGreedy check {name} {v} ({c['tokens']} tokens, {c['dispatch_mode']} vs "
                         f"{c['reference_mode']}): identical={c['identical']}, first divergence "
                         f"{c['first_divergence']}, max |logit diff| up to it {c['max_abs_logit_diff']:.4f} "
                         f"(max |logit| {c['max_abs_logit']:.2f}, bf16 half-ulp there {c['bf16_half_ulp_at_max_logit']:.4f})")
            tf = c.get("teacher_forced")
            if tf:
                lines.append(f"Teacher-forced on the CUDA op's {tf['steps']} greedy steps, each against the fp32 "
                             f"reference op: CUDA op max |logit diff| {tf['cuda']['max_abs_logit_diff']:.4f}, mean "
                             f"{tf['cuda']['mean_abs_logit_diff']:.4f}, top-1 agreement "
                             f"{tf['cuda']['top1_agreement']:.3f}; dense bf16 F.linear (the bf16 level) max "
                             f"{tf['dense_bf16']['max_abs_logit_diff']:.4f}, mean "
                             f"{tf['dense_bf16']['mean_abs_logit_diff']:.4f}, top-1 "
                             f"{tf['dense_bf16']['top1_agreement']:.3f}")
        if info.get("attention", proto.get("attention", "sdpa")) != proto.get("attention", "sdpa"):
            lines.append(f"\nAttention of {name}: {info['attention']} (--attn auto picks per model: LibOrtho's where its "
                         "kernel takes the model)")
        if info.get("errors"):
            lines.append(f"\nErrors {name}: {info['errors']}")
    return "\n".join(lines)


def merge(paths, out) -> dict:
    """One result from several runs (same card; e.g. ``--models smollm2`` and ``--models llama2-7b-shape``)."""
    import json

    from .report_util import write_json, write_text
    parts = [json.loads(Path(p).read_text()) for p in paths]
    cards = {p["card"] for p in parts}
    if len(cards) != 1:
        raise SystemExit(f"refusing to merge results from different cards: {sorted(cards)}")
    for key, default in (("attention", "sdpa"), ("coordinate_descent", False), ("inductor_pdl", False),
                         ("cache_length", "per layer")):  # the header states them once
        seen = {p["protocol"].get(key, default) for p in parts}
        if len(seen) != 1:
            raise SystemExit(f"refusing to merge results run with different {key} settings: {sorted(map(str, seen))}")
    result = dict(parts[0], rows=[], models={}, merged_from=[str(p) for p in paths],
                  dates=[p["date"] for p in parts], commands=[p.get("command") for p in parts])
    for p in parts:
        result["rows"] += p["rows"]
        result["models"].update(p["models"])
    counts = Counter((r["model"], r["batch"], r.get("mode")) for r in result["rows"])
    twice = sorted(k for k, c in counts.items() if c > 1)
    if twice:
        raise SystemExit(f"refusing to merge: rows {twice} (model, batch, mode) appear in more than one result; "
                         "merge one run per model and mode")
    out = Path(out)
    write_json(out, result)
    write_text(out.with_suffix(".md"), summary(result) + "\n")
    print(summary(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


def run(args):
    from .report_util import environment, write_json, write_text
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out")
        return merge(args.merge, args.out)
    args.glu = args.glu and not args.no_fuse  # --no-fuse keeps gate and up apart too
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        from ..ops import cuda as ocuda
        t = time.perf_counter()
        if not ocuda.available():
            raise SystemExit(f"the LibOrtho CUDA kernels are not available ({ocuda._state['error']}); "
                             "refusing to time the reference path as LibOrtho")
        print(f"{torch.cuda.get_device_name(device)}: LibOrtho CUDA extension ready in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
    env = environment(device)
    mode = args.mode or ("graph" if device.type == "cuda" else "eager")
    protocol = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": args.batches,
                "prefill_len": args.prefill_len, "reps": args.reps, "warmup": args.warmup, "mode": mode,
                "density": args.density, "score": args.score, "group_size": args.group_size,
                "variants": args.variants, "fuse_siblings": not args.no_fuse, "glu": args.glu, "norms": args.norms,
                "targets": args.targets,
                "attention": args.attn if args.attn != "auto" else "libortho-step" if device.type == "cuda" else "sdpa",
                "coordinate_descent": args.coordinate_descent, "inductor_pdl": args.inductor_pdl,
                "cache_length": "per layer" if args.per_layer_length else "shared", "method": __doc__.strip()}
    if device.type == "cuda":
        from ..ops import cuda as cuda_ops
        protocol["decode_kernel"], protocol["pdl"] = cuda_ops.decode_kernel(), cuda_ops.pdl_enabled()
        protocol["pdl_mode"], protocol["pdl_max_m"] = cuda_ops.pdl_name(), cuda_ops.pdl_max_m()
        protocol["v1_lean"] = cuda_ops.v1_lean()
    result = {"card": card_name(device) if device.type == "cuda" else env["device"], "torch": torch.__version__,
              "cuda": torch.version.cuda, "transformers": env["transformers"], "date": env["date"],
              "command": env["command"], "protocol": protocol, "rows": [], "models": {}}
    out = Path(args.out or f"benchmarks/results/decode-{card_name(device)}.json")
    partial = out.with_name(out.stem + ".partial.json")  # what is measured so far, replaced after each measurement

    def save_partial(name, rows, info):
        write_json(partial, dict(result, rows=result["rows"] + rows, models={**result["models"], name: info},
                                 partial=True))

    t_all = time.perf_counter()
    for name in args.models:
        t = time.perf_counter()
        with inductor_tuning(args.coordinate_descent, args.inductor_pdl):
            rows, info = bench_model(name, args, device, on_measured=lambda r, i, n=name: save_partial(n, r, i))
        info["total_s"] = time.perf_counter() - t
        result["rows"] += rows
        result["models"][name] = info
    result["total_s"] = time.perf_counter() - t_all
    write_json(out, result)
    partial.unlink(missing_ok=True)
    md = summary(result)
    write_text(out.with_suffix(".md"), md + "\n")
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    _p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_p)
    run(_p.parse_args())
