"""The KV caches' one interface (:class:`KVCache`), and the Hugging Face runner's: a slot KV cache, one row of K/V
per running sample, handed to an unmodified HF model as its cache.

Rows ``0..B-1`` always hold the ``B`` running samples (the scheduler compacts on release), so a
decode step reads plain views ``keys[:B, :, :kv_len]``. Capacity along the sequence axis grows on
demand up to ``max_len``, so memory follows the longest running sequence. The native runner's cache
is paged (:mod:`~twinkle_async.engines.torch.paged_cache`).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Protocol, Sequence

import torch

__all__ = ['KVCache', 'SlotKVCache', 'STAGING_SLOTS', 'kv_shape']

STAGING_SLOTS = 1
"""Slots beyond ``max_num_seqs``: where a prompt too long for one step is prefilled chunk by chunk."""

_GROWTH = 256


class KVCache(Protocol):
    """What the engine core and scheduler do with a KV cache; slot ``i`` holds the KV of the sample in slot ``i``."""

    @property
    def usage(self) -> float:
        """The share of the cache's memory held, 0..1."""

    @property
    def prefix_counts(self) -> tuple[int, int]:
        """Prompt tokens looked up in the prefix cache, and found there, since the start."""

    def fits(self, prompt_len: int, num_samples: int, max_new: int) -> bool:
        """Whether a request of this size fits the cache when nothing else runs."""

    @property
    def free_blocks(self) -> int:
        """Blocks nobody holds or was promised."""

    def blocks_needed(self, prompt_len: int, num_samples: int, max_new: int, cached_tokens: int) -> int:
        """Blocks a request takes until its samples hold ``max_new`` tokens each (``cached_tokens`` of the prompt
        cached already)."""

    def blocks_to_grow(self, slot: int, length: int) -> int:
        """Blocks the slot still takes, beyond what it holds or was promised, to hold ``length`` positions."""

    def cached_tokens(self, prompt: Sequence[int], adapter: str) -> int:
        """Leading prompt tokens whose KV is cached already (a prefix cache hit)."""

    def reserve(self, slot: int, prompt: Sequence[int], num_samples: int, adapter: str,
                use_cached: bool = True) -> Optional[int]:
        """Hold memory for a request prefilled into ``slot`` and its samples' first tokens (later ones take memory
        as they come: :meth:`extend`); ``None`` if it does not fit now, else the prompt tokens already cached
        (``slot`` holds them)."""

    @property
    def register_every(self) -> int:
        """A sample's cached length is worth a :meth:`commit` whenever it is a multiple of this (0: never)."""

    def commit(self, slot: int, tokens: Sequence[int], length: int) -> None:
        """The slot's positions ``< length`` hold ``tokens[:length]``, computed with the current weights."""

    def extend(self, slot: int, length: int) -> bool:
        """Make the slot's positions ``< length`` writable if the memory is free; ``False`` if it is not (the
        scheduler then preempts a sample)."""

    def grow(self, slot: int, length: int) -> None:
        """Make the slot's positions ``< length`` writable (memory :meth:`reserve` or :meth:`extend` found)."""

    def fork(self, src: int, dst: int, length: int) -> None:
        """``dst`` starts with ``src``'s first ``length`` positions (another sample of the same prompt)."""

    def move(self, src: int, dst: int, length: int) -> None:
        """The sample in ``src`` (``length`` positions cached) moves to ``dst``."""

    def free(self, slot: int) -> None:
        """The slot's sample is gone."""

    def new_weights(self, version: int) -> None:
        """Weights changed: nothing cached before may be served again."""

    def reset_prefix_cache(self) -> None: ...

    def release(self) -> None:
        """Free the memory (sleep); every slot is free."""


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
        self._held: set[int] = set()

    @classmethod
    def for_model(cls, model: Any, num_slots: int, max_len: int, device: torch.device) -> SlotKVCache:
        """A cache shaped for ``model``'s layers, KV heads and head size, in its dtype."""
        num_layers, num_kv_heads, head_dim = kv_shape(model)
        return cls(num_layers, num_slots, num_kv_heads, head_dim, max_len, model.dtype, device)

    @staticmethod
    def bytes_per_token(model: Any) -> int:
        """Memory one cached token of ``model`` takes across all layers (keys and values)."""
        num_layers, num_kv_heads, head_dim = kv_shape(model)
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

    @property
    def usage(self) -> float:
        return len(self._held) / self.num_slots

    @property
    def prefix_counts(self) -> tuple[int, int]:
        return 0, 0

    def fits(self, prompt_len: int, num_samples: int, max_new: int) -> bool:
        return True  # the engine refuses num_samples over its slots

    @property
    def free_blocks(self) -> int:
        return sys.maxsize  # every slot has room for max_len positions: memory never runs short

    def blocks_needed(self, prompt_len: int, num_samples: int, max_new: int, cached_tokens: int) -> int:
        return 0

    def blocks_to_grow(self, slot: int, length: int) -> int:
        return 0

    def cached_tokens(self, prompt: Sequence[int], adapter: str) -> int:
        return 0

    def reserve(self, slot: int, prompt: Sequence[int], num_samples: int, adapter: str,
                use_cached: bool = True) -> Optional[int]:
        self._held.add(slot)
        return 0  # every slot has room for max_len positions

    @property
    def register_every(self) -> int:
        return 0

    def commit(self, slot: int, tokens: Sequence[int], length: int) -> None:
        pass

    def extend(self, slot: int, length: int) -> bool:
        self.ensure_capacity(length)
        return True

    def grow(self, slot: int, length: int) -> None:
        self.ensure_capacity(length)

    def fork(self, src: int, dst: int, length: int) -> None:
        self.copy_slot(src, dst, length)
        self._held.add(dst)

    def move(self, src: int, dst: int, length: int) -> None:
        self.copy_slot(src, dst, length)
        self._held.discard(src)
        self._held.add(dst)

    def free(self, slot: int) -> None:
        self._held.discard(slot)

    def new_weights(self, version: int) -> None:
        pass

    def reset_prefix_cache(self) -> None:
        pass

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


def kv_shape(model: Any) -> tuple[int, int, int]:
    """Layers, KV heads and head size of an HF model (``head_dim`` when its config gives one)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim
