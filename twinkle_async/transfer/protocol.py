"""The wire format of a streamed weight update: its header, bucket packing, store keys and process groups.

One update ``n`` goes: the sender puts its :class:`UpdateHeader` under ``request_key(n)`` in the sampler's store;
the sampler announces how many ranks take part under ``world_key(n)`` (``'0'``: it refused the update before any
receiver joined); sender (rank 0) and receivers form a process group under the prefix ``group_prefix(n)`` and
the sender broadcasts each bucket as one flat byte tensor; the sampler puts ``'ok:<version>'`` or
``'error:<message>'`` under ``result_key(n)``.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ['TensorMeta', 'UpdateHeader', 'meta_of', 'pack', 'packed_size', 'unpack', 'request_key', 'world_key',
           'result_key', 'group_prefix', 'connect', 'process_group', 'broadcast', 'BACKENDS', 'ALIGN']

BACKENDS = ('gloo', 'nccl')
ALIGN = 16  # bytes: every tensor in a bucket starts aligned for any dtype's view


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # 'float32', 'bfloat16', ...

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class UpdateHeader:
    """What the sender announces: the tensors bucket by bucket, the version and adapter, the backend."""

    index: int
    buckets: tuple[tuple[TensorMeta, ...], ...]
    version: Optional[int]
    adapter_name: Optional[str]
    backend: str


def meta_of(name: str, tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, tuple(tensor.shape), str(tensor.dtype).removeprefix('torch.'))


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes in one flat uint8 tensor (on their device), each starting at a multiple of ``ALIGN``."""
    parts = []
    for tensor in tensors:
        data = tensor.contiguous().view(-1).view(torch.uint8)
        parts += [data, data.new_zeros(_padded(data.numel()) - data.numel())]
    return torch.cat(parts)


def packed_size(metas: tuple[TensorMeta, ...]) -> int:
    """Bytes of the buffer ``pack`` makes of these tensors."""
    return sum(_padded(meta.nbytes) for meta in metas)


def unpack(buffer: torch.Tensor, metas: tuple[TensorMeta, ...]) -> list[tuple[str, torch.Tensor]]:
    """Views of ``buffer`` as the named tensors ``pack`` put in it."""
    pairs, offset = [], 0
    for meta in metas:
        chunk = buffer[offset:offset + meta.nbytes]
        pairs.append((meta.name, chunk.view(meta.torch_dtype).view(meta.shape)))
        offset += _padded(meta.nbytes)
    return pairs


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def request_key(index: int) -> str:
    return f'update/{index}/request'


def world_key(index: int) -> str:
    return f'update/{index}/world'


def result_key(index: int) -> str:
    return f'update/{index}/result'


def group_prefix(index: int) -> str:
    return f'update/{index}/group/'


def connect(address: str, timeout_s: float, is_master: bool = False) -> Any:
    """A client of the store at ``'host:port'`` (or, ``is_master``, the store itself; port 0 picks a free one)."""
    from torch.distributed import TCPStore

    host, _, port = address.rpartition(':')
    return TCPStore(host, int(port), None, is_master, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def process_group(store: Any, index: int, rank: int, world: int, backend: str, timeout_s: float) -> Any:
    """The process group of update ``index`` (its own, so that a trainer's default group is left alone)."""
    from torch.distributed import PrefixStore, ProcessGroupGloo

    prefixed = PrefixStore(group_prefix(index), store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == 'nccl':
        from torch.distributed import ProcessGroupNCCL
        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(prefixed, rank, world, options)
    return ProcessGroupGloo(prefixed, rank, world, timeout)


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    """Rank 0's ``tensor`` into every rank's (blocking)."""
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank, options.rootTensor = 0, 0
    group.broadcast([tensor], options).wait()
