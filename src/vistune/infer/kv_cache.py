"""A KV cache that is allocated once per batch and filled in place.

transformers' DynamicCache concatenates every layer's keys and values at every
step, copying the whole cache each time; at batch 8 that copy was a third of a
decode step on CPU. The engine knows how long a batch can grow (prompt + max new
tokens), so each layer gets its buffer up front and hands out views of the filled part.
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h = key_states.shape[:2]
        self._k = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
        self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Copy every row ``repeats`` times (a prefix prefilled once, shared by a batch)."""
        if self.is_initialized:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def trim_left(self, n: int) -> None:
        """Forget the first ``n`` positions (padding of every row); a view, nothing is copied."""
        if self.is_initialized and n > 0:
            self._k, self._v = self._k[:, :, n:], self._v[:, :, n:]
            self.capacity -= n
            self.length -= n
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def append_rows(self, other: "PreallocatedLayer", length: int, capacity: int) -> None:
        """Put the rows of ``other`` after this layer's, both left-padded to ``length`` tokens, in buffers
        of ``capacity`` (a batch that new prompts join)."""

        def merged(a: torch.Tensor, b: torch.Tensor, len_a: int, len_b: int) -> torch.Tensor:
            # Zeros, not garbage, in the padding: masked scores must stay finite.
            out = a.new_zeros((a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3]))
            out[: a.shape[0], :, length - len_a:length] = a[:, :, :len_a]
            out[a.shape[0]:, :, length - len_b:length] = b[:, :, :len_b]
            return out

        self._k = merged(self._k, other._k, self.length, other.length)
        self._v = merged(self._v, other._v, self.length, other.length)
        self.capacity, self.length = capacity, length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def reset(self) -> None:
        self.length = 0
        super().reset()


def preallocated_cache(config: PretrainedConfig, capacity: int) -> Cache | None:
    """A cache of `capacity` tokens per row, or None when some layer is not plain full attention
    (sliding windows, linear attention): the model then builds its own cache."""
    text_config = config.get_text_config(decoder=True)
    try:
        layer_types, _ = get_layer_types_and_kwargs(text_config)
    except Exception:
        return None
    if any(DYNAMIC_LAYER_TYPE_MAPPING.get(t) is not DynamicLayer for t in layer_types):
        return None
    return Cache(layers=[PreallocatedLayer(capacity) for _ in layer_types])
