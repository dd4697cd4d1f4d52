"""``initialize`` (Twinkle's keywords), the run mode, ``get_logger`` and ``get_device_placement``."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Optional, Sequence

from twinkle_async.errors import ConfigurationError, NotSupportedError
from twinkle_async.mesh import DeviceGroup, DeviceMesh

__all__ = ['initialize', 'check_local_mesh', 'get_logger', 'get_device_placement']

logger = logging.getLogger('twinkle_async')


class _State:
    mode = 'local'
    groups: list[DeviceGroup] = []
    mesh: Optional[DeviceMesh] = None
    name: Optional[str] = None


def initialize(mode: str = 'local', nproc_per_node: int = 8, ncpu_proc_per_node: int = 8, seed: Optional[int] = 42,
               full_determinism: bool = False, groups: Optional[Sequence[DeviceGroup]] = None,
               global_device_mesh: Optional[DeviceMesh] = None, lazy_collect: bool = True, name: Optional[str] = None,
               notifier: Any = None, *, address: Optional[str] = None, timeout_s: float = 30.0,
               **ray_init_kwargs: Any) -> None:
    """Choose where samplers run, with Twinkle's arguments.

    Args:
        mode: ``'local'`` (this process, the default) or ``'ray'``: connect to the cluster at ``address`` (or
            ``RAY_ADDRESS``; else start a local one with ``ray_init_kwargs``) and reserve every group as a
            placement group of one bundle per worker (``gpus_per_worker`` CPUs or GPUs each). Samplers built with
            ``remote_group=<name>`` then run as Ray actors in that group.
        nproc_per_node, ncpu_proc_per_node: Twinkle's GPU / CPU processes per node; checked (>= 1) and otherwise
            unused: Ray's own resources decide placement here.
        seed: seeds Python's ``random``, NumPy and torch in this process (``None``: leave them). Sampling is
            seeded per request (``SamplingParams.seed``) and per engine (``engine_args['seed']``), not by this.
        full_determinism: also ``torch.use_deterministic_algorithms(True, warn_only=True)`` here.
        groups: the device groups (see :class:`DeviceGroup`); in ``'local'`` mode only recorded.
        global_device_mesh: recorded (``get_device_placement`` shows it).
        lazy_collect: accepted; results here are always returned, never collected lazily.
        name: the run's name, shown by ``get_device_placement``.
        notifier: not supported (errors are raised to the caller); passing one logs a warning.
        timeout_s: how long a group may wait for the cluster's resources.

    Raises:
        ConfigurationError: an unknown mode, bad process counts, or a group the cluster cannot hold within
            ``timeout_s`` (the message names what is missing). NotSupportedError: Ray is not installed.
    """
    if mode not in ('local', 'ray'):
        raise ConfigurationError(f"unknown mode {mode!r}; choose 'local' or 'ray'")
    if nproc_per_node < 1 or ncpu_proc_per_node < 1:
        raise ConfigurationError(f'nproc_per_node={nproc_per_node} and ncpu_proc_per_node={ncpu_proc_per_node} '
                                 'must be >= 1')
    if notifier is not None:
        logger.warning('initialize(notifier=...) is not supported: errors are raised to the caller')
    if seed is not None:
        seed_everything(seed, full_determinism)
    from twinkle_async.ray import cluster

    if mode == 'ray':
        cluster.start_ray(address, **ray_init_kwargs)
        cluster.reserve(groups or (), timeout_s)
    elif _State.mode == 'ray':
        cluster.release_all()
    _State.mode, _State.groups, _State.mesh, _State.name = mode, list(groups or ()), global_device_mesh, name


def seed_everything(seed: int, full_determinism: bool = False) -> None:
    """Seed Python's ``random``, NumPy and torch (and make torch deterministic when asked)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device
    if full_determinism:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)


def check_local_mesh(mesh: Optional[DeviceMesh], remote_group: Optional[str]) -> None:
    """Refuse layouts that need Ray when running locally, with a clear error."""
    if remote_group is not None and _State.mode != 'ray':
        raise ConfigurationError(f"remote_group={remote_group!r} needs initialize('ray', groups=[DeviceGroup("
                                 f"name={remote_group!r}, ...)]) first")
    if remote_group is None and mesh is not None and mesh.dp_size > 1:
        raise NotSupportedError(f'dp_size={mesh.dp_size}: data-parallel replicas run as Ray actors; pass '
                                "remote_group= after initialize('ray', groups=[...])")


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """Twinkle's ``get_logger``: the ``twinkle_async`` logger (or its child ``name``), printing INFO and up to
    stderr unless logging was configured already."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('[%(levelname)s:%(name)s] %(message)s'))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger.getChild(name) if name else logger


def get_device_placement(device_group: Optional[Sequence[DeviceGroup]] = None) -> str:
    """A text picture of the device groups (``initialize``'s, or ``device_group``): per group its device type,
    ranks and workers, and in Ray mode where each worker's bundle was placed."""
    from twinkle_async.ray import cluster

    groups = list(device_group) if device_group is not None else _State.groups
    lines = [f'twinkle_async placement: mode={_State.mode}' + (f', run {_State.name!r}' if _State.name else '')]
    if _State.mesh is not None:
        lines.append(f'  global mesh: dp_size={_State.mesh.dp_size} tp_size={_State.mesh.tp_size}')
    for group in groups:
        lines.append(f'  group {group.name!r}: {group.num_ranks} x {group.device_type}, {group.workers} worker(s) of '
                     f'{group.gpus_per_worker} device(s)')
        if _State.mode == 'ray':
            lines += [f'    worker {i}: node {node}' for i, node in enumerate(cluster.bundle_nodes(group.name))]
    if not groups:
        lines.append('  no device groups')
    return '\n'.join(lines)
