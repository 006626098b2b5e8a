"""A key/value cache that appends in place, for decoding after a shared prefill.

transformers' `DynamicLayer` appends each new token with `torch.cat`, copying the whole cache every step: decoding C
tokens after a P-token prompt copies about C·(P + C/2) positions per layer and row, which on a small model is a large
part of `generate` (with G = 16 completions of 32 tokens after a 300-token prompt, a third of the rollout on CPU).
`InPlaceLayer` keeps its keys and values as views of buffers with room to spare and writes new tokens into them; a
buffer that is full is replaced by one twice as long. The views hold the same numbers as `torch.cat` would give.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into preallocated buffers instead of concatenating."""

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None

    def _in_buffer(self) -> bool:
        """Whether `keys` / `values` are still views at the start of the buffers (a row selection or a reorder
        replaces them with new tensors; a crop keeps them)."""
        return (
            self.key_buffer is not None
            and self.keys.data_ptr() == self.key_buffer.data_ptr()
            and self.values.data_ptr() == self.value_buffer.data_ptr()
            and self.keys.shape[:2] == self.key_buffer.shape[:2]
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.size(-2)
        if not self._in_buffer() or length + new > self.key_buffer.size(-2):
            capacity = 2 * (length + new)
            self.key_buffer = key_states.new_empty((*key_states.shape[:2], capacity, key_states.size(-1)))
            self.value_buffer = value_states.new_empty((*value_states.shape[:2], capacity, value_states.size(-1)))
            if length:
                self.key_buffer[..., :length, :] = self.keys
                self.value_buffer[..., :length, :] = self.values
        self.key_buffer[..., length : length + new, :] = key_states
        self.value_buffer[..., length : length + new, :] = value_states
        self.keys = self.key_buffer[..., : length + new, :]
        self.values = self.value_buffer[..., : length + new, :]
        return self.keys, self.values


def append_in_place(cache) -> None:
    """Make the full-attention layers of a `DynamicCache` append in place (others, e.g. sliding windows, stay)."""
    if type(cache) is not DynamicCache:
        return
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            in_place = InPlaceLayer.__new__(InPlaceLayer)
            in_place.__dict__.update(layer.__dict__)
            cache.layers[index] = in_place
