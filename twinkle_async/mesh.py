"""Device layout (Twinkle's ``DeviceMesh`` / ``DeviceGroup``) and ``initialize``."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from twinkle_async.errors import ConfigurationError, NotSupportedError

__all__ = ['DeviceMesh', 'DeviceGroup', 'initialize', 'current_mode', 'check_local_mesh']

_mode: str = 'local'


class DeviceMesh(BaseModel):
    """How one sampler is laid out: ``dp_size`` replicas, each ``tp_size``-way tensor parallel."""

    model_config = ConfigDict(extra='forbid', frozen=True)

    dp_size: int = Field(default=1, ge=1)
    tp_size: int = Field(default=1, ge=1)

    @classmethod
    def from_sizes(cls, dp_size: int = 1, tp_size: int = 1) -> DeviceMesh:
        return cls(dp_size=dp_size, tp_size=tp_size)

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size


class DeviceGroup(BaseModel):
    """A named set of ``ranks`` devices of ``device_type`` reserved for one role (e.g. 'sampler')."""

    model_config = ConfigDict(extra='forbid', frozen=True)

    name: str
    ranks: int = Field(ge=1)
    device_type: Literal['cpu', 'cuda', 'gpu'] = 'cpu'


def initialize(mode: str = 'local', groups: Optional[Sequence[DeviceGroup]] = None) -> None:
    """Choose where samplers run: ``'local'`` (this process) or ``'ray'`` (a Ray cluster).

    Raises:
        ConfigurationError: an unknown mode. NotSupportedError: Ray mode is not available yet.
    """
    global _mode
    if mode == 'local':
        _mode = mode
        return
    if mode == 'ray':
        raise NotSupportedError("initialize('ray') is not available in this version of twinkle_async yet")
    raise ConfigurationError(f"unknown mode {mode!r}; choose 'local' or 'ray'")


def current_mode() -> str:
    return _mode


def check_local_mesh(mesh: Optional[DeviceMesh], remote_group: Optional[str]) -> None:
    """Refuse layouts this version cannot run yet, with a clear error."""
    if remote_group is not None:
        raise NotSupportedError(f'remote_group={remote_group!r}: Ray execution is not available in this version yet')
    if mesh is not None and mesh.dp_size > 1:
        raise NotSupportedError(f'dp_size={mesh.dp_size}: data-parallel replicas need Ray (not available yet)')
