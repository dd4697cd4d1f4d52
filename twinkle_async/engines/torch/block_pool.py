"""KV blocks as bookkeeping only (no tensors): reference counts, the free queue, reservations and the prefix cache.

A block holds the K/V of ``block_size`` consecutive positions of one or more sequences. Samples of one request
share their prompt's full blocks (each reference counted once), and so do requests whose prompts start alike: a
full prompt block is registered under the hash of its tokens chained to the blocks before it and a ``key`` (the
adapter and weight version), so only the same tokens under the same weights ever match. A block whose count drops
to zero goes to the tail of the free queue and keeps its contents until it is taken from the head again: freed
blocks are evicted least recently used first.

``reserve`` promises blocks ahead (what a request needs to start; a running sample's later blocks are promised one
at a time as it grows, and when none is left the scheduler preempts a sample); ``allocate`` draws on a promise.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

__all__ = ['BlockPool', 'KVPoolExhaustedError', 'block_hashes']


class KVPoolExhaustedError(RuntimeError):
    """More blocks were drawn than were reserved (a bookkeeping bug: the engine cannot go on)."""


@dataclass(slots=True)
class _Block:
    refs: int = 0
    hash: Optional[int] = None
    tokens: tuple[int, ...] = ()
    parent: Optional[int] = None  # hash of the block before it in its sequence


def block_hashes(tokens: Sequence[int], block_size: int, key: Hashable, start: int = 0,
                 parent: Optional[int] = None) -> list[int]:
    """The chained hashes of the full blocks of ``tokens`` from block ``start`` (``parent``: the hash of block
    ``start - 1``)."""
    hashes, previous = [], parent
    for first in range(start * block_size, len(tokens) - block_size + 1, block_size):
        previous = hash((key, previous, tuple(tokens[first:first + block_size])))
        hashes.append(previous)
    return hashes


class BlockPool:
    """``num_blocks`` blocks; counters: ``used`` (referenced blocks), ``reserved`` (promised, not drawn),
    ``prefix_queries`` / ``prefix_hits`` (prompt tokens looked up / found)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [_Block() for _ in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: evicted first
        self.cached: dict[int, int] = {}  # hash -> block
        self.reserved = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def available(self) -> int:
        """Blocks that can still be promised."""
        return len(self.free) - self.reserved

    def reserve(self, count: int, cached: Sequence[int] = ()) -> bool:
        """Promise ``count`` blocks to a later :meth:`allocate`; ``False`` (nothing promised) if they are not free
        beside the ``cached`` blocks about to be taken (:meth:`take_cached`: the free ones leave the free queue)."""
        if count + sum(self.blocks[b].refs == 0 for b in cached) > self.available:
            return False
        self.reserved += count
        return True

    def unreserve(self, count: int) -> None:
        self.reserved -= count

    def allocate(self) -> int:
        """A reserved block, referenced once; its old contents (and prefix-cache entry) are dropped."""
        if self.reserved <= 0 or not self.free:
            raise KVPoolExhaustedError(f'a KV block was drawn beyond the {self.reserved} reserved')
        self.reserved -= 1
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.parent, block.refs = None, (), None, 1
        return block_id

    def share(self, block_ids: Sequence[int]) -> None:
        """One more reference to each of ``block_ids`` (all in use)."""
        for block_id in block_ids:
            self.blocks[block_id].refs += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each; blocks left unreferenced are freed, the last of a sequence evicted first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.refs -= 1
            if block.refs == 0:
                self.free[block_id] = None

    def cached_prefix(self, tokens: Sequence[int], key: Hashable) -> list[int]:
        """The cached blocks holding ``tokens``' longest cached prefix of full blocks (not counted, not taken)."""
        found: list[int] = []
        parent: Optional[int] = None
        for block_hash, first in zip(block_hashes(tokens, self.block_size, key), range(0, len(tokens),
                                                                                     self.block_size)):
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent != parent or block.tokens != tuple(tokens[first:first + self.block_size]):
                break
            found.append(block_id)
            parent = block_hash
        return found

    def take_cached(self, block_ids: Sequence[int], queried_tokens: int) -> None:
        """Reference cached blocks found by :meth:`cached_prefix` (taking free ones off the free queue)."""
        for block_id in block_ids:
            self.free.pop(block_id, None)
        self.share(block_ids)
        self.prefix_queries += queried_tokens
        self.prefix_hits += len(block_ids) * self.block_size

    def register(self, block_id: int, block_hash: int, tokens: Sequence[int], parent: Optional[int]) -> None:
        """Make a full block findable by its tokens' hash (a block already registered under it stays)."""
        if block_hash in self.cached:
            return
        block = self.blocks[block_id]
        block.hash, block.tokens, block.parent = block_hash, tuple(tokens), parent
        self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their memory stays with whoever references it)."""
        for block_id in self.cached.values():
            block = self.blocks[block_id]
            block.hash, block.tokens, block.parent = None, (), None
        self.cached.clear()
