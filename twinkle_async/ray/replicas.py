"""``ReplicaSet``: the replica actors of one remote sampler — launch, call, route, and restart with replay.

Every change of model state that all replicas must share (adapters, weight updates) is kept in a log;
a replica that dies is relaunched in its bundle, replays the log and the pause state, and only then is
routed to again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

from twinkle_async.errors import EngineError, ReplicaDiedError, TwinkleAsyncError, WeightUpdateError
from twinkle_async.mesh import DeviceMesh
from twinkle_async.ray.actor import SamplerActor
from twinkle_async.ray.cluster import ReservedGroup
from twinkle_async.ray.router import Router

__all__ = ['ReplicaSet', 'ReplicaStatus', 'Op']


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as it reports itself: engine counters (``aborted`` counts since the replica last started),
    requests served, weight version, adapters."""

    index: int
    waiting: int
    running: int
    used_slots: int
    served: int
    weight_version: int
    adapters: list[str]
    aborted: int


@dataclass(frozen=True)
class Op:
    """A call every replica gets (``method(*args)`` on the actor); ``adapter``/``names`` say what it touches."""

    method: str
    args: tuple[Any, ...]
    adapter: Optional[str] = None
    names: frozenset[str] = frozenset()


class ReplicaSet:
    """``mesh.dp_size`` :class:`SamplerActor` replicas in ``group``, replica ``i`` in worker bundle ``i``."""

    def __init__(self, group: ReservedGroup, mesh: DeviceMesh, actor_args: tuple[Any, ...]) -> None:
        self.group, self.mesh, self.actor_args = group, mesh, actor_args
        self.router = Router(mesh.dp_size)
        self.actors: list[Any] = []
        self.log: list[Op] = []
        self.paused: Optional[str] = None
        self._restarts: dict[int, asyncio.Task[None]] = {}

    async def start(self) -> None:
        if not self.actors:
            self.actors = list(await asyncio.gather(*(self._launch(i) for i in range(self.mesh.dp_size))))

    async def close(self) -> None:
        import ray

        for task in self._restarts.values():
            task.cancel()
        actors, self.actors = self.actors, []
        await asyncio.gather(*(_close_actor(ray, actor) for actor in actors))

    def record(self, op: Op) -> None:
        """Keep ``op`` for replay, dropping what it makes moot (an adapter's older state, covered updates)."""
        if op.method == 'set_template':
            self.log = [o for o in self.log if o.method != op.method]
        elif op.method in ('add_adapter', 'remove_adapter'):
            self.log = [o for o in self.log if o.adapter != op.adapter]
            if op.method == 'remove_adapter':
                return
        elif op.method == 'update_weights':
            self.log = [o for o in self.log if not (o.method == op.method and o.adapter == op.adapter
                                                    and o.names <= op.names)]
        self.log.append(op)

    async def broadcast(self, op: Op) -> None:
        """``op`` on every live replica (restarting ones replay the log); the first real error is raised."""
        live = [i for i in range(len(self.actors)) if self.router.alive[i]]
        outcomes = await asyncio.gather(*(self.call(i, op.method, *op.args) for i in live), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ReplicaDiedError)]
        if errors:
            raise errors[0]

    async def update(self, op: Op) -> None:
        """A weight update (``op``: ``update_weights(tensors, adapter, version)``) as one transaction: staged on every
        live replica, then committed on all, or discarded on all when any replica fails to stage (or dies then).
        ``op`` joins the log before the commits, so a replica whose commit fails is restarted (out of routing until
        then) and replays the log up to ``version``.

        Raises:
            WeightUpdateError: a replica could not stage the update; no replica changed.
        """
        live = [i for i in range(len(self.actors)) if self.router.alive[i]]
        tensors, adapter, version = op.args
        staged = await asyncio.gather(*(self.call(i, 'stage_weights', tensors, adapter) for i in live),
                                      return_exceptions=True)
        failed = [(i, outcome) for i, outcome in zip(live, staged) if isinstance(outcome, BaseException)]
        if failed:
            await asyncio.gather(*(self.call(i, 'discard_weights') for i in live if self.router.alive[i]),
                                 return_exceptions=True)
            index, error = failed[0]
            raise WeightUpdateError(f'replica {index} could not stage the update ({error}); it was discarded on '
                                    'every replica: all still serve the previous version') from error
        self.record(op)
        committed = await asyncio.gather(*(self.call(i, 'commit_weights', version) for i in live),
                                         return_exceptions=True)
        for index, outcome in zip(live, committed):
            if isinstance(outcome, BaseException) and not isinstance(outcome, ReplicaDiedError):
                self.died(index, outcome)  # restarted: it replays the log to ``version`` before serving again

    async def route(self, work: int, session_id: Optional[str] = None) -> int:
        """A live replica for ``work`` samples (waiting for a restart when every replica is down)."""
        while True:
            try:
                return self.router.pick(work, session_id)
            except LookupError:
                if not self._restarts:
                    raise ReplicaDiedError('every replica is down') from None
                await asyncio.wait(list(self._restarts.values()), return_when=asyncio.FIRST_COMPLETED)

    async def call(self, index: int, method: str, *args: Any) -> Any:
        return await self.resolve(index, getattr(self.actors[index], method).remote(*args))

    async def resolve(self, index: int, ref: Any) -> Any:
        """``await ref``; cancelling cancels the remote call; a dead actor -> ReplicaDiedError + restart."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return await _unwrapped(ref)
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except RayActorError as exc:
            raise self.died(index, exc) from exc

    def died(self, index: int, exc: BaseException) -> ReplicaDiedError:
        """Take replica ``index`` out of routing and start its restart; the error for its callers."""
        if index not in self._restarts and self.actors:
            self.router.alive[index] = False
            self._restarts[index] = asyncio.create_task(self._restart(index))
        return ReplicaDiedError(f'replica {index} died: {exc.__class__.__name__}')

    async def status(self) -> list[ReplicaStatus]:
        statuses = []
        for index in range(len(self.actors)):
            if self.router.alive[index]:
                stats, served, version, adapters = await self.call(index, 'status')
                statuses.append(ReplicaStatus(index, stats.waiting, stats.running, stats.used_slots, served,
                                              version, adapters, stats.aborted))
        return statuses

    async def _launch(self, index: int) -> Any:
        import ray

        options = self.group.actor_options(index)
        actor: Any = ray.remote(SamplerActor).options(**options).remote(*self.actor_args)
        await _unwrapped(actor.start.remote())
        for op in self.log:
            await _unwrapped(getattr(actor, op.method).remote(*op.args))
        if self.paused is not None:
            await _unwrapped(actor.pause.remote(self.paused))
        return actor

    async def _restart(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
            self.actors[index] = await self._launch(index)
            self.router.alive[index] = True
        finally:
            del self._restarts[index]


async def _unwrapped(ref: Any) -> Any:
    """The remote result; an error raised in the actor comes back as itself, not wrapped by Ray."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return await ref
    except RayActorError:
        raise
    except RayTaskError as exc:
        cause = getattr(exc, 'cause', None)
        if isinstance(cause, TwinkleAsyncError):
            raise cause from None
        raise EngineError(f'a replica failed: {cause!r}') from exc


async def _close_actor(ray: Any, actor: Any) -> None:
    try:
        await asyncio.wait_for(_unwrapped(actor.close.remote()), 60)
    except Exception:  # dead or stuck: killing it below is the answer either way
        pass
    ray.kill(actor, no_restart=True)
