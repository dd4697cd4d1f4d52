"""Slot KV cache: one row of K/V per running sample, handed to an unmodified HF model as its cache.

Rows ``0..B-1`` always hold the ``B`` running samples (the scheduler compacts on release), so a
decode step reads plain views ``keys[:B, :, :kv_len]`` and copies nothing. Capacity along the
sequence axis grows on demand up to ``max_len``, so memory follows the longest running sequence.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ['SlotKVCache', 'STAGING_SLOTS']

STAGING_SLOTS = 1
"""Slots beyond ``max_num_seqs``: where a prompt too long for one step is prefilled chunk by chunk."""

_GROWTH = 256


class SlotKVCache:
    """Per-layer buffers ``[num_slots, kv_heads, capacity, head_dim]`` with a duck-typed ``update``."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.max_len = max_len
        self._shape = (num_slots, num_kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self._write_slots: torch.Tensor | None = None
        self._write_positions: torch.Tensor | None = None
        self._read_rows = 0
        self._read_len = 0

    @classmethod
    def for_model(cls, model: Any, num_slots: int, max_len: int, device: torch.device) -> SlotKVCache:
        """A cache shaped for ``model``'s layers, KV heads and head size, in its dtype."""
        num_layers, num_kv_heads, head_dim = _kv_shape(model)
        return cls(num_layers, num_slots, num_kv_heads, head_dim, max_len, model.dtype, device)

    @staticmethod
    def bytes_per_token(model: Any) -> int:
        """Memory one cached token of ``model`` takes across all layers (keys and values)."""
        num_layers, num_kv_heads, head_dim = _kv_shape(model)
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=model.dtype).element_size()

    def ensure_capacity(self, length: int) -> None:
        """Grow every buffer so positions ``< length`` fit (never past ``max_len``)."""
        if length <= self.capacity:
            return
        capacity = min(self.max_len, -(-length // _GROWTH) * _GROWTH)
        shape = (*self._shape[:2], capacity, self._shape[3])
        self.keys = [self._grown(old, shape) for old in self.keys] or self._fresh(shape)
        self.values = [self._grown(old, shape) for old in self.values] or self._fresh(shape)
        self.capacity = capacity

    def release(self) -> None:
        """Free every buffer (sleep); the next ``ensure_capacity`` allocates again."""
        self.keys, self.values, self.capacity = [], [], 0

    def plan_prefill(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Next forward is packed prefill: token ``t`` is written to ``(slots[t], positions[t])``."""
        self._write_slots, self._write_positions, self._read_rows = slots, positions, 0

    def plan_decode(self, rows: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward decodes rows ``0..rows-1``, one token each at ``positions``; reads ``kv_len``."""
        self._write_slots = torch.arange(rows, device=positions.device)
        self._write_positions, self._read_rows, self._read_len = positions, rows, kv_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[T, kv_heads, head_dim]`` of token ``t`` at ``(slots[t], positions[t])``."""
        self.keys[layer][slots, :, positions] = key
        self.values[layer][slots, :, positions] = value

    def rows(self, layer: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first ``length`` positions of rows ``0..rows-1``: ``[rows, kv_heads, length, head_dim]``."""
        return self.keys[layer][:rows, :, :length], self.values[layer][:rows, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by each HF attention layer: store the new K/V, return what attention should read."""
        assert self._write_slots is not None and self._write_positions is not None
        if self._read_rows == 0:  # packed prefill: [1, heads, T, dim]; attend within the pack
            self.write(layer_idx, self._write_slots, self._write_positions, key_states[0].transpose(0, 1),
                       value_states[0].transpose(0, 1))
            return key_states, value_states
        self.write(layer_idx, self._write_slots, self._write_positions, key_states[:, :, 0], value_states[:, :, 0])
        return self.rows(layer_idx, self._read_rows, self._read_len)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst`` in every layer."""
        for buffer in (*self.keys, *self.values):
            buffer[dst, :, :length] = buffer[src, :, :length]

    def _fresh(self, shape: tuple[int, ...]) -> list[torch.Tensor]:
        return [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]

    def _grown(self, old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        new[:, :, :old.shape[2]] = old
        return new


def _kv_shape(model: Any) -> tuple[int, int, int]:
    """Layers, KV heads and head size of an HF model (``head_dim`` when its config gives one)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim
