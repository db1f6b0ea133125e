"""A preallocated KV cache for `generate`'s decoding loop."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that writes each step into a buffer sized for the whole generation.

    HF's `DynamicLayer` grows by `torch.cat`, re-copying the layer's whole cache at every token; here each
    step writes only its own positions and attention reads a view of the filled part (5% of a 47M model's
    bf16 sampling time on CPU, measured). Only `generate`'s plain sampling path is used: the batch never
    shrinks, and the methods below that reshape a cache keep the buffer consistent by starting a new one.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if not self.is_initialized or end > self._keys.shape[-2]:
            self._allocate(key_states, value_states, max(self.capacity, end))
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        B, H, _, D = key_states.shape
        keys = key_states.new_empty(B, H, capacity, D)
        values = value_states.new_empty(B, H, capacity, value_states.shape[-1])
        if self.is_initialized and self.length:
            keys[:, :, :self.length] = self.keys
            values[:, :, :self.length] = self.values
        self._keys, self._values = keys, values
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _restart_from_current(self) -> None:
        # After an out-of-place edit of self.keys/values (crop, beam reorder, batch select): copy them into a
        # fresh buffer so later writes land in the tensors attention reads.
        if self.is_initialized:
            self.length = self.keys.shape[-2]
            self._allocate(self.keys, self.values, max(self.capacity, self.length))  # copies the filled part
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._restart_from_current()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._restart_from_current()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._restart_from_current()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._restart_from_current()


def preallocated_cache(model: nn.Module, capacity: int) -> Cache | None:
    """A `DynamicCache` whose full-attention layers are `PreallocatedLayer`s; None where the model's cache
    layout is not the plain one (sliding-window and other layer types keep HF's own classes)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config HF cannot map to cache layers: let generate build its own
        return None
    if not any(type(layer) is DynamicLayer for layer in cache.layers):
        return None  # e.g. Mistral's sliding-window layers
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
