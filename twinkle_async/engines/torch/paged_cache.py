"""Paged KV cache of the native runner: per-layer block pools ``[num_blocks, kv_heads, block_size, head_dim]`` and
a block table per slot.

A slot is a row of the block table (``tables[slot]``: its blocks in position order), not a region of memory: a
sample's KV grows a block at a time from a bounded pool, finished samples give their blocks back without any
copying, and the samples of a request (and requests with a common prompt prefix, under the same adapter and
weights) reference the same prompt blocks (:class:`~twinkle_async.engines.torch.block_pool.BlockPool`). Each
sample copies only the prompt's last, partly filled block, which it goes on to write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

import torch

from twinkle_async.engines.torch.block_pool import BlockPool, KVPoolExhaustedError, block_hashes
from twinkle_async.engines.torch.kv_cache import SlotKVCache, kv_shape
from twinkle_async.engines.torch.native.kernels import cpu_kernels

__all__ = ['PagedKVCache']


@dataclass(slots=True)
class _Slot:
    blocks: list[int] = field(default_factory=list)
    reserved: int = 0      # blocks promised to this slot, not drawn yet
    per_sample: int = 0    # of those, what each sample forked from this slot takes along
    adapter: Optional[str] = None
    key: Hashable = None   # the prefix-cache key its blocks were hashed with
    hashes: list[int] = field(default_factory=list)  # hashes of its leading full blocks registered so far


class PagedKVCache:
    """``keys[layer]`` / ``values[layer]``: the block pools (allocated on first use, freed by :meth:`release`);
    ``tables``: ``[num_slots, max_len / block_size]`` block ids (int64), valid up to each slot's length."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers, self.num_slots, self.max_len = num_layers, num_slots, max_len
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.tables = torch.zeros((num_slots, -(-max_len // block_size)), dtype=torch.long, device=device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.weight_version = 0
        self._shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self._dtype, self._device = dtype, device
        self._slots = [_Slot() for _ in range(num_slots)]
        self._kernels = cpu_kernels() if device.type == 'cpu' else None

    @classmethod
    def for_model(cls, model: Any, num_slots: int, max_len: int, memory_bytes: int, block_size: int,
                  device: torch.device) -> PagedKVCache:
        """A cache shaped for ``model``, its pool as many blocks as ``memory_bytes`` holds (no more than every slot
        could fill with ``max_len`` positions)."""
        block_bytes = SlotKVCache.bytes_per_token(model) * block_size
        num_blocks = min(memory_bytes // block_bytes, num_slots * -(-max_len // block_size))
        num_layers, num_kv_heads, head_dim = kv_shape(model)
        return cls(num_layers, num_slots, num_kv_heads, head_dim, max_len, num_blocks, block_size, model.dtype, device)

    @property
    def usage(self) -> float:
        """The share of the pool's blocks referenced."""
        return self.pool.used / self.pool.num_blocks

    @property
    def prefix_counts(self) -> tuple[int, int]:
        """Prompt tokens looked up in the prefix cache, and found there, since the start."""
        return self.pool.prefix_queries, self.pool.prefix_hits

    # -- admission --
    def cached_tokens(self, prompt: Sequence[int], adapter: str) -> int:
        """Leading prompt tokens a :meth:`reserve` would find cached now (at least one token is left to compute)."""
        return len(self._hits(prompt, adapter)) * self.block_size

    def fits(self, prompt_len: int, num_samples: int, max_new: int) -> bool:
        """Whether the pool holds such a request when nothing else runs."""
        return self._needed(prompt_len, num_samples, max_new, 0)[0] <= self.pool.num_blocks

    @property
    def free_blocks(self) -> int:
        return self.pool.available

    def blocks_needed(self, prompt_len: int, num_samples: int, max_new: int, cached_tokens: int) -> int:
        return self._needed(prompt_len, num_samples, max_new, cached_tokens // self.block_size)[0]

    def blocks_to_grow(self, slot: int, length: int) -> int:
        state = self._slots[slot]
        return max(0, -(-min(length, self.max_len) // self.block_size) - len(state.blocks) - state.reserved)

    def reserve(self, slot: int, prompt: Sequence[int], num_samples: int, adapter: str,
                use_cached: bool = True) -> Optional[int]:
        """Hold the blocks a request needs to start: its prompt, prefilled into ``slot`` (minus the cached prefix,
        which ``slot`` now references), and for each sample the block its first token goes to (later blocks come
        from :meth:`extend`). Returns the prompt tokens cached, or ``None`` (nothing held) if the pool is short."""
        hits = self._hits(prompt, adapter) if use_cached else []
        needed, per_sample = self._needed(len(prompt), num_samples, 1, len(hits))
        if not self.pool.reserve(needed, hits):
            return None
        self.pool.take_cached(hits, len(prompt) if use_cached else 0)
        state = self._slots[slot]
        state.reserved, state.per_sample, state.adapter = needed, per_sample, adapter
        self._set_blocks(slot, hits)
        return len(hits) * self.block_size

    @property
    def register_every(self) -> int:
        """A sample's cached length is worth a :meth:`commit` whenever it is a multiple of this (a block filled)."""
        return self.block_size

    def commit(self, slot: int, tokens: Sequence[int], length: int) -> None:
        """The slot's positions ``< length`` hold ``tokens[:length]`` (a prompt, or a prompt and what a sample
        generated), computed with the current weights: make its full blocks among them findable."""
        state, size = self._slots[slot], self.block_size
        if state.adapter is None:
            return
        if state.key != self._key(state.adapter):  # first commit, or computed again under new weights
            state.key, state.hashes = self._key(state.adapter), []
        done = len(state.hashes)
        fresh = block_hashes(tokens[:length], size, state.key, done, state.hashes[-1] if done else None)
        for index, block_hash in enumerate(fresh, start=done):
            parent = state.hashes[-1] if state.hashes else None
            self.pool.register(state.blocks[index], block_hash, tokens[index * size:(index + 1) * size], parent)
            state.hashes.append(block_hash)

    # -- growth and slot moves --
    def extend(self, slot: int, length: int) -> bool:
        """Blocks for the slot's positions ``< length``: from its reservation, then from the blocks nobody was
        promised; ``False`` if those ran out (the slot keeps the blocks it got)."""
        state = self._slots[slot]
        while len(state.blocks) * self.block_size < length:
            if not state.reserved:
                if not self.pool.reserve(1):
                    return False
                state.reserved = 1
            self._ensure_allocated()
            block = self.pool.allocate()
            state.reserved -= 1
            self.tables[slot, len(state.blocks)] = block
            state.blocks.append(block)
        return True

    def grow(self, slot: int, length: int) -> None:
        """:meth:`extend`, which must succeed: the scheduler made room for every position a step writes."""
        if not self.extend(slot, length):
            raise KVPoolExhaustedError(f'slot {slot} needs blocks for {length} positions and the pool has none free')

    def fork(self, src: int, dst: int, length: int) -> None:
        """Slot ``dst`` starts as ``src``'s first ``length`` positions: the full blocks shared, the last partial one
        copied; ``dst`` takes one sample's share of ``src``'s reservation."""
        source, target = self._slots[src], self._slots[dst]
        full = length // self.block_size
        self.pool.share(source.blocks[:full])
        source.reserved -= source.per_sample
        target.reserved, target.per_sample = source.per_sample, 0
        target.adapter, target.key, target.hashes = source.adapter, source.key, source.hashes[:full]
        self._set_blocks(dst, source.blocks[:full])
        if length % self.block_size:
            self.grow(dst, length)
            for pool in (*self.keys, *self.values):
                pool[target.blocks[-1]] = pool[source.blocks[full]]

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s blocks and reservation now belong to ``dst`` (empty); nothing is copied."""
        self._slots[dst], self._slots[src] = self._slots[src], _Slot()
        self.tables[dst] = self.tables[src]

    def free(self, slot: int) -> None:
        """Give back the slot's blocks and what remains of its reservation."""
        state = self._slots[slot]
        self.pool.release(state.blocks)
        self.pool.unreserve(state.reserved)
        self._slots[slot] = _Slot()

    # -- the forward's reads and writes --
    def locate(self, slots: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where tokens at ``(slots[t], positions[t])`` live: ``(block ids, offsets in the block)``."""
        return self.tables[slots, positions // self.block_size], positions % self.block_size

    def write(self, layer: int, where: tuple[torch.Tensor, torch.Tensor], key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[T, kv_heads, head_dim]`` at :meth:`locate`'s places."""
        blocks, offsets = where
        if self._kernels is not None:  # a copy per row and head instead of ATen's indexed assignment
            self._kernels.write_rows_(self.keys[layer], blocks, offsets, key)
            self._kernels.write_rows_(self.values[layer], blocks, offsets, value)
            return
        self.keys[layer][blocks, :, offsets] = key
        self.values[layer][blocks, :, offsets] = value

    def gather(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the slot's first ``length`` positions, ``[kv_heads, length, head_dim]`` each."""
        keys, values = self.gather_rows(layer, slot + 1, length, first=slot)
        return keys[0], values[0]

    def gather_rows(self, layer: int, rows: int, length: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first ``length`` positions of slots ``first..rows-1`` (past a slot's own length: whatever its
        table points at; mask it), ``[rows - first, kv_heads, length, head_dim]`` each."""
        blocks = self.tables[first:rows, :-(-length // self.block_size)]
        keys, values = (pool[blocks].transpose(1, 2).flatten(2, 3)[:, :, :length]
                        for pool in (self.keys[layer], self.values[layer]))
        return keys, values

    # -- weights, sleep --
    def new_weights(self, version: int) -> None:
        """Cached prompt blocks were computed with older weights: never serve them again."""
        self.weight_version = version
        self.pool.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def release(self) -> None:
        """Free the pools (sleep; every slot must be free). The next :meth:`grow` allocates them again."""
        self.pool.reset_prefix_cache()
        self.keys, self.values = [], []

    def _ensure_allocated(self) -> None:
        if not self.keys:
            self.keys = [torch.empty(self._shape, dtype=self._dtype, device=self._device)
                         for _ in range(self.num_layers)]
            self.values = [torch.empty(self._shape, dtype=self._dtype, device=self._device)
                           for _ in range(self.num_layers)]

    def _needed(self, prompt_len: int, num_samples: int, max_new: int, cached_blocks: int) -> tuple[int, int]:
        """Blocks to reserve for a request, and of those each sample's (past the prompt's full blocks)."""
        size = self.block_size
        per_sample = -(-min(prompt_len + max_new, self.max_len) // size) - prompt_len // size
        return -(-prompt_len // size) - cached_blocks + num_samples * per_sample, per_sample

    def _hits(self, prompt: Sequence[int], adapter: str) -> list[int]:
        return self.pool.cached_prefix(prompt[:len(prompt) - 1], self._key(adapter))

    def _key(self, adapter: str) -> tuple[str, int]:
        return adapter, self.weight_version

    def _set_blocks(self, slot: int, blocks: list[int]) -> None:
        self._slots[slot].blocks = list(blocks)
        if blocks:
            self.tables[slot, :len(blocks)] = torch.tensor(blocks, dtype=torch.long, device=self.tables.device)
