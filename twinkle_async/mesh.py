"""Device layout (Twinkle's ``DeviceMesh`` / ``DeviceGroup``) and ``initialize``."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

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


def initialize(mode: str = 'local', groups: Optional[Sequence[DeviceGroup]] = None, *,
               address: Optional[str] = None, timeout_s: float = 30.0, **ray_init_kwargs: Any) -> None:
    """Choose where samplers run: ``'local'`` (this process, the default) or ``'ray'``.

    In Ray mode, connects to the cluster at ``address`` (or ``RAY_ADDRESS``; else starts a local one)
    and reserves each group as a placement group, one bundle (a CPU, or a GPU for 'cuda'/'gpu') per rank.
    Samplers built with ``remote_group=<name>`` then run as Ray actors in that group.

    Raises:
        ConfigurationError: an unknown mode, or a group the cluster cannot hold within ``timeout_s``
            (the message names what is missing). NotSupportedError: Ray is not installed.
    """
    global _mode
    if mode not in ('local', 'ray'):
        raise ConfigurationError(f"unknown mode {mode!r}; choose 'local' or 'ray'")
    from twinkle_async.ray import cluster

    if mode == 'local':
        if _mode == 'ray':
            cluster.release_all()
        _mode = mode
        return
    cluster.start_ray(address, **ray_init_kwargs)
    cluster.reserve(groups or (), timeout_s)
    _mode = mode


def current_mode() -> str:
    return _mode


def check_local_mesh(mesh: Optional[DeviceMesh], remote_group: Optional[str]) -> None:
    """Refuse layouts that need Ray when running locally, with a clear error."""
    if remote_group is not None and _mode != 'ray':
        raise ConfigurationError(f"remote_group={remote_group!r} needs initialize('ray', groups=[DeviceGroup("
                                 f"name={remote_group!r}, ...)]) first")
    if remote_group is None and mesh is not None and mesh.dp_size > 1:
        raise NotSupportedError(f'dp_size={mesh.dp_size}: data-parallel replicas run as Ray actors; pass '
                                "remote_group= after initialize('ray', groups=[...])")
