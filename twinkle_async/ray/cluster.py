"""``initialize('ray', groups=...)``: connect to (or start) Ray and reserve each device group as a placement group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from twinkle_async.errors import ConfigurationError, NotSupportedError
from twinkle_async.mesh import DeviceGroup

__all__ = ['ReservedGroup', 'start_ray', 'reserve', 'reserved_group', 'release_all', 'bundle_nodes', 'bundle_for',
           'actor_resources']

DEFAULT_TIMEOUT_S = 30.0


def bundle_for(group: DeviceGroup) -> dict[str, float]:
    """One worker's bundle: ``gpus_per_worker`` GPUs (a 'cuda' group) or CPUs."""
    return {('GPU' if group.device_type == 'cuda' else 'CPU'): float(group.gpus_per_worker)}


@dataclass(frozen=True)
class ReservedGroup:
    """A device group held as a Ray placement group: one bundle per worker."""

    group: DeviceGroup
    placement_group: Any

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def workers(self) -> int:
        return self.group.workers

    @property
    def devices_per_worker(self) -> int:
        return self.group.gpus_per_worker

    def actor_options(self, bundle: int) -> dict[str, Any]:
        """Ray options that put an actor in bundle ``bundle`` of this group, holding its devices."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=bundle)
        return {'scheduling_strategy': strategy, **actor_resources(self.group)}


def actor_resources(group: DeviceGroup) -> dict[str, float]:
    """What a replica actor of ``group`` asks Ray for: its worker's devices (a GPU worker needs no CPU bundle)."""
    if group.device_type == 'cuda':
        return {'num_gpus': float(group.gpus_per_worker), 'num_cpus': 0}
    return {'num_cpus': float(group.gpus_per_worker)}


_groups: dict[str, ReservedGroup] = {}


def start_ray(address: Optional[str] = None, **init_kwargs: Any) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one.

    Raises:
        NotSupportedError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise NotSupportedError("initialize('ray') needs Ray: pip install 'twinkle-async[ray]'") from exc
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get('RAY_ADDRESS'), include_dashboard=False, **init_kwargs)


def reserve(groups: Sequence[DeviceGroup], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[ReservedGroup]:
    """Reserve every group (an existing reservation of the same shape is kept).

    Raises:
        ConfigurationError: a group the cluster cannot hold within ``timeout_s`` (what is missing is named).
    """
    return [_reserve_one(group, timeout_s) for group in groups]


def reserved_group(name: str) -> ReservedGroup:
    """Raises ConfigurationError when ``name`` was not reserved by ``initialize('ray', groups=...)``."""
    if name not in _groups:
        known = ', '.join(map(repr, _groups)) or 'none'
        raise ConfigurationError(f"remote_group={name!r} is not a group reserved by initialize('ray', "
                                 f'groups=[...]) (reserved: {known})')
    return _groups[name]


def bundle_nodes(name: str) -> list[str]:
    """The node id each worker bundle of group ``name`` was placed on ('-' when not placed)."""
    from ray.util.placement_group import placement_group_table

    group = _groups.get(name)
    if group is None:
        return []
    table = placement_group_table(group.placement_group)
    nodes = table.get('bundles_to_node_id', {}) if isinstance(table, dict) else {}
    return [str(nodes.get(i, '-'))[:12] for i in range(group.workers)]


def release_all() -> None:
    """Give every reservation back (``initialize('local')``)."""
    from ray.util.placement_group import remove_placement_group

    for group in _groups.values():
        remove_placement_group(group.placement_group)
    _groups.clear()


def _reserve_one(group: DeviceGroup, timeout_s: float) -> ReservedGroup:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    existing = _groups.get(group.name)
    if existing is not None:
        if existing.group == group:
            return existing
        remove_placement_group(_groups.pop(group.name).placement_group)
    bundle = bundle_for(group)
    reservation = placement_group([dict(bundle) for _ in range(group.workers)], strategy='PACK',
                                  name=f'twinkle-async-{group.name}')
    if not reservation.wait(timeout_s):
        remove_placement_group(reservation)
        kind = next(iter(bundle))
        raise ConfigurationError(
            f'device group {group.name!r} needs {group.num_ranks} x {kind}; the Ray cluster has '
            f'{ray.cluster_resources().get(kind, 0):g} {kind} in all and '
            f'{ray.available_resources().get(kind, 0):g} free (waited {timeout_s:g} s)')
    reserved = ReservedGroup(group, reservation)
    _groups[group.name] = reserved
    return reserved
