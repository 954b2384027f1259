"""A transformers ``StaticCache`` whose layers share one device-side length: ``shared_length_cache(model, ...)``.

transformers' ``StaticLayer`` keeps a length per layer and advances it in every layer's ``update`` (a one-element add,
one more launch per layer and decode step: 32 of ~390 launches in a compiled 7B step). Here every full-attention layer
reads the same length tensor and none advances it; the owner adds each forward's token count once, after the model has
run (``cache.length.add_(n)``; ``StaticDecoder`` does). The K / V rows are written where ``StaticLayer`` writes them,
so the cache's contents, masks and positions are the same as transformers'; ``cache.crop`` moves the shared length
once. Models with other layer kinds (sliding windows, linear attention) keep transformers' cache unchanged.
"""
from __future__ import annotations

import functools

import torch


def plain_cache(model, batch: int, max_cache_len: int):
    """transformers' own StaticCache (5.x signature, with a fallback to the 4.x one)."""
    from transformers import StaticCache
    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # transformers 4.x
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_cache_len,
                           device=p.device, dtype=p.dtype)


@functools.cache
def _layer_class():
    """One class for every cache (compiled steps guard on the layers' type)."""
    from transformers.cache_utils import StaticLayer

    class SharedLengthLayer(StaticLayer):
        """A ``StaticLayer`` that reads the cache's shared length and leaves advancing it to the owner."""

        def lazy_initialization(self, key_states, value_states):
            shared = self.cumulative_length
            super().lazy_initialization(key_states, value_states)
            self.cumulative_length = shared  # on the model's device already: the same tensor for every layer

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            pos = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
            self.keys.index_copy_(2, pos, key_states)
            self.values.index_copy_(2, pos, value_states)
            return self.keys, self.values

    return SharedLengthLayer


@functools.cache
def _cache_class(base: type):
    class SharedLengthCache(base):
        """``base`` (transformers' StaticCache) whose crop moves the shared length once, not once per layer."""

        def crop(self, tokens_to_remove: int) -> None:
            self.layers[0].crop(tokens_to_remove)  # StaticLayer.crop: checks the sign, subtracts from the length

    return SharedLengthCache


def shared_length_cache(model, batch: int, max_cache_len: int):
    """A StaticCache for ``model`` whose full-attention layers share one length (see the module's doc), kept in
    ``cache.length`` (a 0-d long tensor on the model's device; the owner adds each forward's token count), or
    transformers' own cache unchanged with ``cache.length = None``."""
    cache = plain_cache(model, batch, max_cache_len)
    layers = getattr(cache, "layers", None)
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:  # transformers 4.x: no layers to share a length
        StaticLayer = None
    if StaticLayer is None or not layers or any(type(layer) is not StaticLayer for layer in layers):
        cache.length = None  # transformers' layers advance themselves
        return cache
    device = next(model.parameters()).device
    length = torch.zeros((), dtype=torch.long, device=device)
    cls = _layer_class()
    for layer in layers:
        layer.__class__ = cls
        layer.cumulative_length = length
    cache.__class__ = _cache_class(type(cache))
    cache.length = length
    return cache
