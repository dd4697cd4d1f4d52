"""``StreamedWeights``: an update being streamed by a :class:`WeightSender`, as the engines receive it.

It is what ``update_weights`` gets from a weight channel: picklable (it travels to Ray replicas), and iterable as
``(name, tensor)`` pairs like any other weights — iterating joins the update's process group and receives every
bucket first (a receiver must take part in the whole broadcast whatever its engine thinks of the tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

from twinkle_async.transfer.protocol import (
    UpdateHeader,
    broadcast,
    connect,
    packed_size,
    process_group,
    unpack,
    world_key,
)

__all__ = ['StreamedWeights']


@dataclass(frozen=True)
class StreamedWeights:
    """Update ``header.index`` from the sender whose store is at ``address``; ``rank`` / ``world`` once placed."""

    address: str
    header: UpdateHeader
    timeout_s: float
    rank: Optional[int] = None
    world: Optional[int] = None

    def split(self, receivers: int) -> list[StreamedWeights]:
        """One part per receiver (ranks 1..``receivers``); announces the group's size to the sender."""
        connect(self.address, self.timeout_s).set(world_key(self.header.index), str(receivers + 1))
        return [replace(self, rank=rank, world=receivers + 1) for rank in range(1, receivers + 1)]

    def receive(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of the update (blocking: joins the group and takes each bucket's broadcast)."""
        assert self.rank is not None and self.world is not None, 'split() places the receivers first'
        store = connect(self.address, self.timeout_s)
        group = process_group(store, self.header.index, self.rank, self.world, self.header.backend, self.timeout_s)
        device = 'cuda' if self.header.backend == 'nccl' else 'cpu'
        pairs = []
        for metas in self.header.buckets:
            buffer = torch.empty(packed_size(metas), dtype=torch.uint8, device=device)
            broadcast(group, buffer)
            pairs += [(name, tensor.clone()) for name, tensor in unpack(buffer, metas)]  # not views of the bucket
        return pairs

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        part = self if self.rank is not None else self.split(1)[0]
        return iter(part.receive())
