"""``WeightSender``: the trainer's side of a streamed weight update (a plain process or a Ray actor)."""

from __future__ import annotations

import pickle
from typing import Optional

import torch

from twinkle_async.errors import ConfigurationError, WeightUpdateError
from twinkle_async.transfer.protocol import (
    BACKENDS,
    UpdateHeader,
    broadcast,
    connect,
    meta_of,
    pack,
    process_group,
    request_key,
    result_key,
    world_key,
)
from twinkle_async.weights import DEFAULT_BUCKET_BYTES, NamedTensors, buckets, named_tensors

__all__ = ['WeightSender']


class WeightSender:
    """Streams named tensors into a sampler's engines over ``torch.distributed`` (gloo for CPU tensors, NCCL for
    CUDA ones), in buckets of at most ``bucket_bytes``; the sampler stages the update on every engine and applies it
    all-or-nothing with a version, exactly as ``update_weights``.

    Args:
        address: what the sampler's ``open_weight_channel()`` returned (``'host:port'`` of its store).
        bucket_bytes: the most bytes broadcast at once (a larger tensor travels alone).
        timeout_s: how long any one step (the sampler's answer, a collective) may take.

    Usage (in the trainer's process)::

        sender = WeightSender(address)
        version = sender.send(model.state_dict())     # blocks until every engine serves it
    """

    def __init__(self, address: str, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 300.0) -> None:
        self.address, self.bucket_bytes, self.timeout_s = address, bucket_bytes, timeout_s
        self.store = connect(address, timeout_s)

    def send(self, weights: NamedTensors, *, version: Optional[int] = None,
             adapter_name: Optional[str] = None) -> int:
        """Send an update of the base model (or of ``adapter_name``) and wait until it is applied.

        Args:
            weights: a ``name -> tensor`` mapping or ``(name, tensor)`` pairs, all on the CPU (gloo) or all on CUDA
                devices (NCCL); checkpoint names, as for ``update_weights``.
            version: the version the sampler serves it as (default: its current one + 1).

        Returns:
            The version now served.

        Raises:
            WeightUpdateError: the sampler refused the update (the reason, e.g. a bad name, is in the message);
                nothing was applied.
        """
        pairs = [(name, tensor.detach()) for name, tensor in named_tensors(weights)]
        backend = _backend_of(pairs)
        groups = list(buckets(pairs, self.bucket_bytes))
        index = int(self.store.add('updates', 1))
        header = UpdateHeader(index, tuple(tuple(meta_of(n, t) for n, t in g.items()) for g in groups), version,
                              adapter_name, backend)
        self.store.set(request_key(index), pickle.dumps(header))
        world = int(self.store.get(world_key(index)))
        if world:
            group = process_group(self.store, index, 0, world, backend, self.timeout_s)
            for bucket in groups:
                broadcast(group, pack(list(bucket.values())))
        return _outcome(self.store.get(result_key(index)).decode())

    def close(self) -> None:
        self.store = None

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _backend_of(pairs: list[tuple[str, torch.Tensor]]) -> str:
    kinds = {tensor.device.type for _, tensor in pairs}
    if not pairs or len(kinds) != 1 or not kinds <= {'cpu', 'cuda'}:
        raise ConfigurationError(f'WeightSender.send: every tensor must be on the CPU or every one on CUDA '
                                 f'(got devices {sorted(kinds) or "none"})')
    return BACKENDS[0] if kinds == {'cpu'} else BACKENDS[1]


def _outcome(result: str) -> int:
    status, _, detail = result.partition(':')
    if status != 'ok':
        raise WeightUpdateError(detail)
    return int(detail)
