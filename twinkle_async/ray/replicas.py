"""``ReplicaSet``: the replica actors of one :class:`ReplicaEngine` — launch, call, route, and restart with replay.

Every change of model state that all replicas must share (adapters, weight updates) is kept in a log;
a replica that dies is relaunched in its bundle, replays the log and the pause state, and only then is
routed to again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, Optional

from twinkle_async.errors import EngineError, ReplicaDiedError, TwinkleAsyncError, WeightUpdateError
from twinkle_async.mesh import DeviceMesh
from twinkle_async.ray.cluster import ReservedGroup
from twinkle_async.ray.engine_actor import EngineActor, EngineInfo
from twinkle_async.ray.router import Router

__all__ = ['ReplicaSet', 'ReplicaStatus', 'Op']


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as it reports itself: engine counters (``aborted`` counts since the replica last started),
    requests served, weight version, adapters, and the process id of its actor."""

    index: int
    waiting: int
    running: int
    used_slots: int
    served: int
    weight_version: int
    adapters: list[str]
    aborted: int
    pid: int


@dataclass(frozen=True)
class Op:
    """A call every replica gets (``method(*args)`` on the actor); ``adapter``/``names`` say what it touches;
    ``seq`` orders recorded ops."""

    method: str
    args: tuple[Any, ...]
    adapter: Optional[str] = None
    names: frozenset[str] = frozenset()
    seq: int = 0


class ReplicaSet:
    """``mesh.dp_size`` :class:`EngineActor` replicas in ``group``, replica ``i`` in worker bundle ``i``.

    The set keeps a log of what changes a replica's model (adapters, committed weight updates) and the pause state;
    a replica that died is restarted in its bundle and replays the log before it takes work again.
    """

    def __init__(self, group: ReservedGroup, mesh: DeviceMesh, actor_args: tuple[Any, ...]) -> None:
        self.group, self.mesh, self.actor_args = group, mesh, actor_args
        self.router = Router(mesh.dp_size)
        self.actors: list[Any] = []
        self.log: list[Op] = []
        self.paused: Optional[str] = None
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._staged_on: list[int] = []
        self._seq = 0

    async def start(self) -> list[EngineInfo]:
        """Start every replica (in parallel); what each one's engine reports."""
        launched = await asyncio.gather(*(self._launch(i) for i in range(self.mesh.dp_size)))
        self.actors = [actor for actor, _ in launched]
        return [info for _, info in launched]

    async def close(self) -> None:
        import ray

        for task in self._restarts.values():
            task.cancel()
        actors, self.actors = self.actors, []
        await asyncio.gather(*(_close_actor(ray, actor) for actor in actors))

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if self.router.alive[i]]

    def record(self, op: Op) -> None:
        """Keep ``op`` for replay, dropping what it makes moot (an adapter's older state, covered updates)."""
        if op.method in ('add_adapter', 'remove_adapter'):
            self.log = [o for o in self.log if o.adapter != op.adapter]
            if op.method == 'remove_adapter':
                return
        elif op.method == 'apply_update':
            self.log = [o for o in self.log if not (o.method == op.method and o.adapter == op.adapter
                                                    and o.names <= op.names)]
        self._seq += 1
        self.log.append(replace(op, seq=self._seq))

    async def broadcast(self, op: Op) -> None:
        """``op`` on every live replica (restarting ones replay the log); the first real error is raised."""
        outcomes = await asyncio.gather(*(self.call(i, op.method, *op.args) for i in self.live),
                                        return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ReplicaDiedError)]
        if errors:
            raise errors[0]

    async def stage(self, calls: dict[int, tuple[Any, ...]]) -> list[Any]:
        """``stage_weights(*args)`` on each replica of ``calls`` (every live one), or on none; their results.

        Raises:
            WeightUpdateError: a replica could not stage it (named); it was discarded on every replica.
        """
        live = list(calls)
        staged = await asyncio.gather(*(self.call(i, 'stage_weights', *args) for i, args in calls.items()),
                                      return_exceptions=True)
        failed = [(i, outcome) for i, outcome in zip(live, staged) if isinstance(outcome, BaseException)]
        if failed:
            await self.discard(live)
            index, error = failed[0]
            raise WeightUpdateError(f'replica {index} could not stage the update ({error}); it was discarded on '
                                    'every replica: all still serve the previous version') from error
        self._staged_on = live
        return staged

    async def commit(self, op: Op, version: int) -> None:
        """Commit the staged update (``op``: ``apply_update(weights, adapter, version)``, for replay) on every
        replica that staged it. ``op`` joins the log first, so a replica whose commit fails is restarted (out of
        routing until then) and replays the log up to ``version``; one that was restarting meanwhile replays it
        too."""
        self.record(op)
        targets, self._staged_on = self._staged_on, []
        committed = await asyncio.gather(*(self.call(i, 'commit_weights', version) for i in targets),
                                         return_exceptions=True)
        for index, outcome in zip(targets, committed):
            if isinstance(outcome, BaseException) and not isinstance(outcome, ReplicaDiedError):
                self.died(index, outcome)

    async def discard(self, targets: Optional[list[int]] = None) -> None:
        """Forget the staged update everywhere (errors ignored: a dead replica holds nothing)."""
        targets = self._staged_on if targets is None else targets
        self._staged_on = []
        await asyncio.gather(*(self.call(i, 'discard_weights') for i in targets if self.router.alive[i]),
                             return_exceptions=True)

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
        for index in self.live:
            stats, served, version, adapters, pid = await self.call(index, 'status')
            statuses.append(ReplicaStatus(index, stats.waiting, stats.running, stats.used_slots, served, version,
                                          adapters, stats.aborted, pid))
        return statuses

    async def _launch(self, index: int) -> tuple[Any, EngineInfo]:
        """A started replica in bundle ``index`` that has replayed the log (ops recorded meanwhile included)."""
        import ray

        options = self.group.actor_options(index)
        actor: Any = ray.remote(EngineActor).options(**options).remote(*self.actor_args)
        info = await _unwrapped(actor.start.remote())
        replayed = 0
        while pending := [op for op in self.log if op.seq > replayed]:
            for op in pending:
                await _unwrapped(getattr(actor, op.method).remote(*op.args))
                replayed = op.seq
        if self.paused is not None:
            await _unwrapped(actor.pause.remote(self.paused))
        return actor, info

    async def _restart(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
            self.actors[index], _ = await self._launch(index)
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
