"""The batch KV cache: one row per running sequence, left-aligned so every row writes its next token at one column.

Because all rows end at the same column, a decode step is a single forward over the whole batch (the shared
`cache_position` HF expects), while rows may have any length: shorter rows are left-padded and the padding is masked
by the runner's attention mask. Each layer keeps a buffer with spare capacity, so appending a token writes in place
instead of re-concatenating the whole cache every step (what HF's DynamicCache does). Rows join by `extend` (after
their own prefill) and leave by `select`; `drop_leading` trims columns that have become padding for every row.

Only the runner touches this object.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

_MIN_CAPACITY = 64


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer with spare capacity along the time axis."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._set_buffers(key_states[:, :, :0].clone(), value_states[:, :, :0].clone(), 0)
        self.is_initialized = True

    def _set_buffers(self, key_buffer: Tensor, value_buffer: Tensor, length: int) -> None:
        self._key_buffer, self._value_buffer, self.length = key_buffer, value_buffer, length
        self.keys = key_buffer[:, :, :length]
        self.values = value_buffer[:, :, :length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self.reserve(max(end, 2 * self._key_buffer.shape[-2], _MIN_CAPACITY))
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self._set_buffers(self._key_buffer, self._value_buffer, end)
        return self.keys, self.values

    def reserve(self, capacity: int) -> None:
        k, v = self._key_buffer, self._value_buffer
        key_buffer = k.new_zeros((*k.shape[:2], capacity, k.shape[-1]))
        value_buffer = v.new_zeros((*v.shape[:2], capacity, v.shape[-1]))
        key_buffer[:, :, : self.length] = self.keys
        value_buffer[:, :, : self.length] = self.values
        self._set_buffers(key_buffer, value_buffer, self.length)


class BatchKVCache(Cache):
    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[GrowableLayer() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers[0].is_initialized else 0

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.layers[0]._key_buffer.device)
        for layer in self.layers:
            layer._set_buffers(layer._key_buffer[index], layer._value_buffer[index], layer.length)

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` time steps (they are padding for every row)."""
        if columns <= 0:
            return
        for layer in self.layers:
            layer._set_buffers(
                layer._key_buffer[:, :, columns:], layer._value_buffer[:, :, columns:], layer.length - columns
            )

    def extend(self, other: BatchKVCache) -> None:
        """Append `other`'s rows below ours, left-padding whichever side is shorter so both end at one column."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.layers, other.layers):
            rows = mine._key_buffer.shape[0] + theirs._key_buffer.shape[0]
            k = mine._key_buffer
            key_buffer = k.new_zeros((rows, k.shape[1], max(length + _MIN_CAPACITY, 2 * length), k.shape[-1]))
            value_buffer = torch.zeros_like(key_buffer)
            split = mine._key_buffer.shape[0]
            key_buffer[:split, :, length - mine.length : length] = mine.keys
            value_buffer[:split, :, length - mine.length : length] = mine.values
            key_buffer[split:, :, length - theirs.length : length] = theirs.keys
            value_buffer[split:, :, length - theirs.length : length] = theirs.values
            mine._set_buffers(key_buffer, value_buffer, length)
