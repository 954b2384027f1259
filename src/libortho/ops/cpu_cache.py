"""The reference backend's dense weights kept between calls on the CPU.

Without a GPU every call of the op rebuilds ``deq(Q) + alpha * S`` from the packed bytes: ~16 ns a weight on two
cores, about a second a token for SmolLM2, against ~0.2 ms for the product itself. This cache keeps the fp32
matrices the reference would rebuild, so the op returns the same bits while calling it again costs a matmul.

* What is kept: for one layer's packed buffers (fused groups count as one) the fp32 weight for the last alpha used.
* When it is rebuilt: a new alpha, a buffer replaced (``.to()``, ``load_state_dict`` of new tensors) or changed in
  place (tensor version counters and data pointers), or a buffer freed (the entry goes with it). At ``alpha == 0``
  the ortho arrays are not part of the key: they are never read.
* How much: up to ``$LIBORTHO_CPU_CACHE_MB`` MiB (default 1024; 0 turns it off). Entries are added until the budget
  is full and never pushed out by newer ones: a model's layers are called in a cycle, so keeping the first that fit
  hits every step, where least-recently-used eviction would miss on every call.
* Not kept: tensors on another device, tensors that require grad, tensor subclasses (fake tensors while
  tracing), and inference-mode tensors (they have no version counter, so a change could not be seen).
"""
from __future__ import annotations

import os
import weakref
from typing import Callable

import torch

_DEFAULT_MB = 1024


class DenseWeightCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.hits = self.misses = 0
        self._entries: dict[int, tuple] = {}  # id(first buffer) -> (refs, versions, key, weight, token)
        self._tokens = 0

    def clear(self) -> None:
        """Drop every entry and zero the counts."""
        self._entries.clear()
        self.used_bytes = self.hits = self.misses = 0

    def get(self, tensors: tuple, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The weight ``build()`` returns for these buffers and key, from the cache when nothing changed."""
        if not self._cacheable(tensors):
            return build()
        head = tensors[0]
        versions = tuple((t._version, t.data_ptr()) for t in tensors)  # data_ptr: `.data =` leaves the version
        entry = self._entries.get(id(head))
        if entry is not None:
            refs, old_versions, old_key, weight, _ = entry
            # equal versions tuples have equal lengths, so zip covers every buffer
            if old_key == key and old_versions == versions and all(r() is t for r, t in zip(refs, tensors)):
                self.hits += 1
                return weight
            self._drop(id(head))
        self.misses += 1
        weight = build()
        size = weight.numel() * weight.element_size()
        if self.used_bytes + size <= self.budget_bytes:
            self._tokens += 1
            self._entries[id(head)] = (tuple(weakref.ref(t) for t in tensors), versions, key, weight, self._tokens)
            self.used_bytes += size
            weakref.finalize(head, self._drop_if_token, id(head), self._tokens)
        return weight

    @staticmethod
    def _cacheable(tensors: tuple) -> bool:
        # plain tensors only: fake or functional ones (tracing) must not be kept or read
        return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and not t.requires_grad
                   and not t.is_inference() for t in tensors)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry[3].numel() * entry[3].element_size()

    def _drop_if_token(self, key: int, token: int) -> None:
        # the buffer is gone; its id may name a newer entry by now, so drop only the entry made with it
        entry = self._entries.get(key)
        if entry is not None and entry[4] == token:
            self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)


def _budget_from_env() -> int:
    raw = os.environ.get("LIBORTHO_CPU_CACHE_MB", str(_DEFAULT_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"LIBORTHO_CPU_CACHE_MB={raw!r} is not a number; expected MiB (0 turns the cache off)") \
            from None
    if mb < 0:
        raise ValueError(f"LIBORTHO_CPU_CACHE_MB={raw!r} is negative; expected MiB (0 turns the cache off)")
    return int(mb * 2 ** 20)


CACHE = DenseWeightCache(_budget_from_env())


def set_budget(mb: float) -> None:
    """Cache up to ``mb`` MiB of dense weights from now on (0: off); what is cached now is dropped."""
    if mb < 0:
        raise ValueError(f"the CPU weight cache's budget must be >= 0 MiB, got {mb}")
    CACHE.clear()
    CACHE.budget_bytes = int(mb * 2 ** 20)
