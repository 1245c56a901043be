"""KV caches for transformers models: a cache that grows in place (sampling) and the check that a model's cache is
plain full attention (needed to read a context once and continue many sequences from it, in sampling and in the
RL update)."""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in a buffer with room to grow; it hands out views of the filled
        part, so a decode step writes one position instead of concatenating (copying) the whole cache. The buffer
        doubles when full, so it never holds more than twice what the plain layer holds after its concatenation."""

        def __init__(self, room: int):
            super().__init__()
            self.room = room

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            n, q = (self.keys.shape[-2] if self.is_initialized else 0), key_states.shape[-2]
            if not self.is_initialized or n + q > self.buf_k.shape[-2]:
                cap = max(2 * (n + q), n + q + self.room)
                buf_k = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
                buf_v = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
                if n:
                    buf_k[..., :n, :], buf_v[..., :n, :] = self.keys, self.values
                self.buf_k, self.buf_v = buf_k, buf_v
                self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self.buf_k[..., n:n + q, :], self.buf_v[..., n:n + q, :] = key_states, value_states
            self.keys, self.values = self.buf_k[..., :n + q, :], self.buf_v[..., :n + q, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Rows ``indices`` of the cache (repeats allowed: one prompt read once, continued by many samples)."""
            if self.is_initialized:
                n = self.keys.shape[-2]
                self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
                self.keys, self.values = self.buf_k[..., :n, :], self.buf_v[..., :n, :]

    return DynamicLayer, GrowingLayer


def _plain_dynamic_cache(model: nn.Module):
    """An empty transformers DynamicCache for ``model`` when every layer of it is a plain full-attention
    DynamicLayer (no sliding window, indexer, quantisation …), else None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
    except Exception:   # not a transformers config the cache can read: leave the cache to the model
        return None
    plain, _ = _growing_layer_class()
    if not cache.layers or any(type(layer) is not plain for layer in cache.layers):
        return None
    return cache


def has_plain_kv_cache(model: nn.Module) -> bool:
    """Whether ``model``'s KV cache is plain full attention: then a cache filled with a context and indexed per row
    continues any number of sequences exactly as reading them whole would."""
    return _plain_dynamic_cache(model) is not None


def growing_cache(model: nn.Module, room: int):
    """A transformers DynamicCache for ``model`` whose layers grow in place (room for ``room`` tokens after the
    prompt), or None (the model makes its own) unless its cache is plain full attention."""
    cache = _plain_dynamic_cache(model)
    if cache is not None:
        _, growing = _growing_layer_class()
        cache.layers = [growing(room) for _ in cache.layers]
    return cache


def _cache_field() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# The KV cache's name, as a forward keyword and as an output field: transformers renamed ``past_key_values`` to
# ``cache`` (the old name warns, and goes in 5.40); the CPU vLLM engine pins transformers < 5.20, which knows only
# the old one. Pass ``**{CACHE: cache}`` and read ``returned_cache(out)`` to run on both.
CACHE: str = _cache_field()


def returned_cache(out) -> object:
    """The KV cache a forward with ``use_cache=True`` returned (``out.cache``, or ``out.past_key_values``)."""
    return getattr(out, CACHE)
