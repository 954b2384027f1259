"""Small shims over transformers versions (4.45 .. 5.x)."""
from __future__ import annotations

import torch


def from_config(config, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    key = "dtype" if _transformers_major() >= 5 else "torch_dtype"
    return AutoModelForCausalLM.from_config(config, **{key: dtype})


def from_pretrained(path, dtype=None, **kw):
    from transformers import AutoModelForCausalLM
    if dtype is not None:
        kw["dtype" if _transformers_major() >= 5 else "torch_dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def _transformers_major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])
