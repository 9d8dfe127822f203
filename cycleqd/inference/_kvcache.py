"""A KV cache for the HF backend's decode loop: in-place appends, row selection, joining.

``transformers.DynamicCache`` appends each decoded position with ``torch.cat`` over the whole
cache, i.e. it copies every layer's keys and values (B, kv_heads, T, head_dim) once per token.
For SmolLM2-135M with 32 rows of ~600 positions that is ~1.8 GB of memory traffic per step and
half of a decode step on 2 CPU cores (torch profiler: ``aten::cat`` 52 % of self time).
:class:`GrowingLayer` keeps keys/values in a buffer with spare capacity and writes new
positions in place; ``keys``/``values`` stay views of the filled part, so every transformers
code path that reads them (attention, ``get_seq_length``, masks) sees a normal layer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer stored in a (B, kv_heads, capacity, head_dim) buffer.

    ``keys``/``values`` are views ``buffer[:, :, :T]`` of the filled length T; an update of n
    positions writes ``buffer[:, :, T:T + n]`` and grows the buffer by ``GROW`` spare positions
    only when it is full. Any base-class method that reassigns ``keys`` (crop, reorder...) is
    picked up on the next update (the buffer is rebuilt from ``keys``).
    """

    GROW = 128  # spare positions allocated at a time

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents by ``keys``/``values`` (B, kv_heads, T, head_dim), copied into a
        new buffer with ``GROW`` spare positions."""
        b, h, t, d = keys.shape
        self._kb = keys.new_empty((b, h, t + self.GROW, d))
        self._vb = values.new_empty((b, values.shape[1], t + self.GROW, values.shape[-1]))
        self._kb[:, :, :t] = keys
        self._vb[:, :, :t] = values
        self.keys, self.values = self._kb[:, :, :t], self._vb[:, :, :t]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        t = self.keys.shape[-2]
        stale = getattr(self, "_kb", None) is None or self.keys.data_ptr() != self._kb.data_ptr()
        if stale or t + key_states.shape[-2] > self._kb.shape[-2] \
                or self.keys.shape[0] != key_states.shape[0]:
            self.assign(torch.cat([self.keys, key_states], dim=-2),
                        torch.cat([self.values, value_states], dim=-2))
            return self.keys, self.values
        n = t + key_states.shape[-2]
        self._kb[:, :, t:n] = key_states
        self._vb[:, :, t:n] = value_states
        self.keys, self.values = self._kb[:, :, :n], self._vb[:, :, :n]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.assign(self.keys[indices], self.values[indices])


def growing_cache() -> DynamicCache:
    """An empty ``DynamicCache`` whose layers (created lazily, one per decoder layer) are
    :class:`GrowingLayer`."""
    cache = DynamicCache.__new__(DynamicCache)
    Cache.__init__(cache, layer_class_to_replicate=GrowingLayer)
    return cache


def joinable(cache: Cache | None) -> bool:
    """True when every layer is an initialised full-attention layer (keys/values
    (B, kv_heads, T, head_dim)) whose rows can be left-padded, joined and trimmed."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(la) in (DynamicLayer, GrowingLayer) and la.is_initialized
                                for la in layers)


def _assign(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, GrowingLayer):
        layer.assign(keys, values)
    else:
        layer.keys, layer.values = keys, values


def join(cache: Cache, mask: torch.Tensor, new_cache: Cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append ``new_cache``'s rows to ``cache`` in place, left-padding the shorter side along the
    sequence axis. Masks are (B, T) and (N, T2) 0/1 attention masks; returns the (B + N,
    max(T, T2)) mask of the joined cache. Both caches must be :func:`joinable`."""
    width = max(mask.shape[1], new_mask.shape[1])
    pad = torch.nn.functional.pad
    for la, nl in zip(cache.layers, new_cache.layers):
        _assign(la, torch.cat([pad(la.keys, (0, 0, width - la.keys.shape[-2], 0)),
                               pad(nl.keys, (0, 0, width - nl.keys.shape[-2], 0))]),
                torch.cat([pad(la.values, (0, 0, width - la.values.shape[-2], 0)),
                           pad(nl.values, (0, 0, width - nl.values.shape[-2], 0))]))
    return torch.cat([pad(mask, (width - mask.shape[1], 0)), pad(new_mask, (width - new_mask.shape[1], 0))])


def trim(cache: Cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading positions that no row attends to (the left padding left behind when long
    rows are evicted) from a :func:`joinable` cache and its (B, T) mask; returns the mask."""
    first = int(mask.any(0).int().argmax())
    if first > 0:
        for la in cache.layers:
            _assign(la, la.keys[:, :, first:], la.values[:, :, first:])
        mask = mask[:, first:]
    return mask
