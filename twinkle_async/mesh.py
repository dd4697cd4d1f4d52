"""Device layout in Twinkle's forms: ``DeviceMesh.from_sizes(...)`` and ``DeviceGroup(...)``.

A sampler uses two dimensions: ``dp_size`` replicas (Ray actors), each ``tp_size``-way tensor parallel (vLLM).
Twinkle's other dimensions are accepted at 1 (what a trainer's mesh leaves them at) and refused above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from twinkle_async.errors import ConfigurationError, NotSupportedError

__all__ = ['DeviceMesh', 'DeviceGroup', 'DEVICE_TYPES']

_UNUSABLE = ('fsdp_size', 'pp_size', 'ulysses_size', 'cp_size', 'ep_size', 'etp_size', 'ep_fsdp_size', 'vpp_size')
DEVICE_TYPES: dict[str, str] = {'cpu': 'cpu', 'gpu': 'cuda', 'cuda': 'cuda'}
"""Accepted ``device_type`` spellings (any case) -> 'cpu' or 'cuda'."""


class DeviceMesh(BaseModel):
    """How one sampler is laid out: ``dp_size`` replicas, each ``tp_size``-way tensor parallel."""

    model_config = ConfigDict(extra='forbid', frozen=True)

    dp_size: int = Field(default=1, ge=1)
    tp_size: int = Field(default=1, ge=1)
    device_type: Optional[str] = None

    @classmethod
    def from_sizes(cls, *, world_size: Optional[int] = None, dp_size: Optional[int] = None,
                   tp_size: Optional[int] = None, device_type: Optional[str] = None,
                   sequence_parallel: bool = False, **other_sizes: Optional[int]) -> DeviceMesh:
        """Twinkle's constructor: ``from_sizes(world_size=4, dp_size=4)``, ``from_sizes(world_size=2, tp_size=2)``.

        Args:
            world_size: ranks in all; must be ``dp_size * tp_size`` (``dp_size`` is derived from it when not
                given).
            dp_size: replicas. tp_size: tensor-parallel ranks per replica.
            device_type: recorded ('cpu', 'cuda', ...). sequence_parallel: Megatron's, must stay off.
            other_sizes: Twinkle's ``fsdp_size``, ``pp_size``, ``ulysses_size``, ``cp_size``, ``ep_size``,
                ``etp_size``, ``ep_fsdp_size``, ``vpp_size``: ``None`` or 1 (a sampler has no such dimension).

        Raises:
            ConfigurationError: a dimension a sampler cannot use set above 1 (named), an unknown keyword, or a
                ``world_size`` that is not ``dp_size * tp_size``.
        """
        for name, size in other_sizes.items():
            if name not in _UNUSABLE:
                raise ConfigurationError(f'DeviceMesh.from_sizes: unknown argument {name!r}')
            if size is not None and size > 1:
                raise ConfigurationError(f'DeviceMesh.from_sizes({name}={size}): a sampler cannot use this dimension '
                                         '(it runs dp_size replicas of tp_size tensor-parallel ranks)')
        if sequence_parallel:
            raise ConfigurationError('DeviceMesh.from_sizes(sequence_parallel=True): a sampler has no sequence '
                                     'parallelism')
        tp = tp_size or 1
        if dp_size is None:
            if world_size is not None and world_size % tp:
                raise ConfigurationError(f'DeviceMesh.from_sizes: world_size={world_size} is not a multiple of '
                                         f'tp_size={tp}')
            dp_size = (world_size or tp) // tp
        if world_size is not None and world_size != dp_size * tp:
            raise ConfigurationError(f'DeviceMesh.from_sizes: world_size={world_size} but dp_size={dp_size} x '
                                     f'tp_size={tp} = {dp_size * tp}')
        return cls(dp_size=dp_size, tp_size=tp, device_type=device_type)

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size


@dataclass(frozen=True)
class DeviceGroup:
    """Devices reserved for one role (Twinkle's ``DeviceGroup``), e.g. ``DeviceGroup(name='sampler', ranks=4,
    device_type='GPU', gpus_per_worker=2)``: two workers of two GPUs each.

    Args:
        name: what samplers pass as ``remote_group``.
        ranks: how many devices, or the list of their ranks (only its length matters here: Ray places them).
        device_type: 'CPU' / 'cpu', or 'GPU' / 'gpu' / 'cuda' (any case); stored as 'cpu' or 'cuda'.
        gpus_per_worker: devices per worker; a replica gets one worker, so > 1 gives it that many devices
            for tensor parallelism (CPUs in a CPU group).
        visible_devices: Twinkle's device pinning; recorded, not applied (Ray assigns devices to actors).

    Raises:
        ConfigurationError: an unknown device type, no ranks, or ranks not a multiple of ``gpus_per_worker``.
    """

    name: str
    ranks: Union[int, list[int]]
    device_type: str = 'cpu'
    gpus_per_worker: int = 1
    visible_devices: Optional[Any] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        kind = DEVICE_TYPES.get(str(self.device_type).lower())
        if kind is None:
            raise ConfigurationError(f'DeviceGroup {self.name!r}: device_type must be one of CPU, GPU or cuda (any '
                                     f'case), got {self.device_type!r}')
        object.__setattr__(self, 'device_type', kind)
        if isinstance(self.ranks, list):
            if len(set(self.ranks)) != len(self.ranks) or any(not isinstance(r, int) or r < 0 for r in self.ranks):
                raise ConfigurationError(f'DeviceGroup {self.name!r}: ranks must be distinct ints >= 0, '
                                         f'got {self.ranks}')
            object.__setattr__(self, 'ranks', list(self.ranks))
        if self.num_ranks < 1 or self.gpus_per_worker < 1 or self.num_ranks % self.gpus_per_worker:
            raise ConfigurationError(f'DeviceGroup {self.name!r}: ranks={self.num_ranks} must be a positive multiple '
                                     f'of gpus_per_worker={self.gpus_per_worker}')

    @property
    def num_ranks(self) -> int:
        return len(self.ranks) if isinstance(self.ranks, list) else self.ranks

    @property
    def workers(self) -> int:
        """Workers (replica slots) of ``gpus_per_worker`` devices each."""
        return self.num_ranks // self.gpus_per_worker


def with_tensor_parallel(engine_args: dict[str, Any], engine: str, tp_size: int) -> dict[str, Any]:
    """``engine_args`` with vLLM's ``tensor_parallel_size`` set to ``tp_size`` (unless given already).

    Raises:
        NotSupportedError: ``tp_size > 1`` on the torch engine, which has no tensor parallelism.
    """
    if tp_size > 1 and engine == 'torch':
        raise NotSupportedError(f'tp_size={tp_size}: the torch engine has no tensor parallelism; use the vllm '
                                'engine (vLLMSampler)')
    if tp_size > 1:
        engine_args.setdefault('tensor_parallel_size', tp_size)
    return engine_args
