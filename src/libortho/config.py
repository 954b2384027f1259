"""OrthoConfig: every choice of a decomposition, validated up front and written into each save."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from . import quant
from .sieve import SCORES, check_density

METHODS = ("rtn", "gptq")
BASE_FROM = ("self", "reference")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OrthoConfig:
    """How to split each target linear into a low-bit base and a sparse ortho stream.

    bits, group_size, symmetric: the base grid (group_size -1 = per row).
    density: fraction of each layer's weights kept in the ortho stream, in (0, 1); a base-only
        model is the explicit ``OrthoConfig.base_only(...)`` (density 0, score "none").
    score: "hessian" (needs calibration), "magnitude" or "random" (a seeded control).
    method: "rtn" (round to nearest, post-hoc sieve) or "gptq" (error-compensating sweep with the
        ortho entries pulled out inside the sweep; needs calibration).
    base_from: "self" or "reference" (delta mode: the base quantizes a reference model's weights).
    targets: regex over module names selecting the linears (default: every linear in the decoder
        blocks). dtype: storage dtype of scales and ortho values (use "bfloat16" for a model that
        will run in bf16, so the grid is fitted in the dtype it runs in).
    damp, act_order, clip_search, block_size: GPTQ knobs (dampening as a fraction of the mean
        Hessian diagonal; sweep by decreasing H_jj; search the clipping range per group).
    """
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    density: float = 0.01
    score: str = "magnitude"
    method: str = "rtn"
    base_from: str = "self"
    targets: str | None = None
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = True
    block_size: int = 128
    seed: int = 0
    dtype: str = "float16"

    def __post_init__(self):
        quant.check_bits(self.bits)
        quant.check_group_size(self.group_size)
        if self.score == "none":
            if self.density != 0:
                raise ValueError(f"score='none' is the base-only config and needs density=0, got {self.density}")
        else:
            if self.score not in SCORES:
                raise ValueError(f"score={self.score!r} is not supported; expected one of {SCORES} "
                                 "(or 'none' via OrthoConfig.base_only)")
            check_density(self.density)
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; expected one of {METHODS}")
        if self.base_from not in BASE_FROM:
            raise ValueError(f"base_from={self.base_from!r} is not supported; expected one of {BASE_FROM}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; expected one of {tuple(_DTYPES)}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp!r} must be in [0, 1) (fraction of the mean Hessian diagonal)")
        if self.block_size <= 0 or self.block_size % 16:
            raise ValueError(f"block_size={self.block_size!r} must be a positive multiple of 16")
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"targets={self.targets!r} is not a valid regular expression: {e}") from None

    @classmethod
    def base_only(cls, **kw) -> "OrthoConfig":
        return cls(density=0.0, score="none", **kw)

    @property
    def has_ortho(self) -> bool:
        return self.density > 0

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.score == "hessian"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OrthoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **kw) -> "OrthoConfig":
        return dataclasses.replace(self, **kw)
