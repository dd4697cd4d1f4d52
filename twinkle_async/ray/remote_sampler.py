"""``RemoteSampler``: the :class:`AsyncSampler` API over ``dp_size`` replica actors on Ray.

Requests go to the replica with the least work in flight (a list is spread item by item; a
``session_id`` keeps a conversation on one replica). Adapters and weight updates go to every replica
(tensors put in the object store once) and are logged, so a replica that dies is restarted, replays
the log (same adapters, same weight version) and only then takes work again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Optional, Sequence, Union

from twinkle_async.adapters import AdapterSource, load_adapter
from twinkle_async.data_format.outputs import TokenDelta
from twinkle_async.engines.base import PAUSE_MODES, PauseMode
from twinkle_async.errors import (AdapterNotFoundError, ConfigurationError, EngineError, InvalidRequestError,
                                  NotSupportedError, ReplicaDiedError, TwinkleAsyncError, WeightUpdateError)
from twinkle_async.mesh import DeviceMesh
from twinkle_async.models import DEFAULT_MODEL
from twinkle_async.ray.actor import SamplerActor
from twinkle_async.ray.cluster import reserved_group
from twinkle_async.ray.router import Router
from twinkle_async.sampler.async_sampler import AsyncSampler, InputLike, TemplateSpec
from twinkle_async.sampler.requests import ParamsLike, coerce_params
from twinkle_async.weights import NamedTensors, named_tensors, next_version

__all__ = ['RemoteSampler', 'ReplicaStatus']


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as it reports itself: engine counters, requests served, weight version, adapters."""

    index: int
    waiting: int
    running: int
    used_slots: int
    served: int
    weight_version: int
    adapters: list[str]


@dataclass
class _Op:
    """One entry of the state log a restarted replica replays."""

    method: str
    args: tuple[Any, ...]
    adapter: Optional[str] = None
    names: frozenset[str] = frozenset()


class RemoteSampler(AsyncSampler):
    """``AsyncSampler(..., remote_group=name, device_mesh=DeviceMesh.from_sizes(dp_size=N, tp_size=T))``.

    Args:
        remote_group: a group reserved with ``initialize('ray', groups=[DeviceGroup(name, ranks, ...)])``;
            it needs ``dp_size * tp_size`` ranks.
        retry: resend requests of a replica that died to another one (else they fail with
            :class:`ReplicaDiedError`). Streams are never resent: their first tokens were already yielded.
        coalesce_s: how long a replica gathers stream deltas into one Ray item.
    """

    def __init__(self, model_id: str = DEFAULT_MODEL, engine: str = 'torch',
                 engine_args: Optional[Mapping[str, Any]] = None, template: Optional[TemplateSpec] = None, *,
                 remote_group: str, device_mesh: Optional[DeviceMesh] = None, retry: bool = False,
                 coalesce_s: float = 0.005) -> None:
        super().__init__(model_id, engine, engine_args, template)
        self.group = reserved_group(remote_group)
        self.mesh = device_mesh or DeviceMesh()
        if self.mesh.world_size > self.group.ranks:
            raise ConfigurationError(f'dp_size={self.mesh.dp_size} x tp_size={self.mesh.tp_size} needs '
                                     f'{self.mesh.world_size} ranks; group {remote_group!r} has {self.group.ranks}')
        if self.mesh.tp_size > 1:
            if engine == 'torch':
                raise NotSupportedError(f'tp_size={self.mesh.tp_size}: the torch engine has no tensor parallelism')
            self.engine_args.setdefault('tensor_parallel_size', self.mesh.tp_size)
        self.retry, self.coalesce_s = retry, coalesce_s
        self.router = Router(self.mesh.dp_size)
        self.actors: list[Any] = []
        self._log: list[_Op] = []
        self._version = 0
        self._paused: Optional[str] = None
        self._restarts: dict[int, asyncio.Task[None]] = {}

    # -- lifecycle --
    async def start(self) -> None:
        """Start every replica (in parallel) and wait until all serve."""
        if not self.actors:
            self.actors = list(await asyncio.gather(*(self._launch(i) for i in range(self.mesh.dp_size))))

    async def close(self) -> None:
        """Close every replica's engine and end its actor."""
        import ray

        for task in self._restarts.values():
            task.cancel()
        actors, self.actors = self.actors, []
        await asyncio.gather(*(_close_actor(ray, actor) for actor in actors))

    @property
    def engine(self) -> Any:
        raise NotSupportedError('a remote sampler has no local engine: see replica_status()')

    def set_template(self, template: TemplateSpec, **kwargs: Any) -> None:
        """Use another chat template on every replica (taking effect before later requests)."""
        if kwargs:
            raise NotSupportedError('template keyword arguments are not sent to remote replicas')
        self._template_spec = template
        for actor in self.actors:
            actor.set_template.remote(template)

    async def replica_status(self) -> list[ReplicaStatus]:
        """What every live replica reports (dead ones are being restarted and left out)."""
        statuses = []
        for index in range(len(self.actors)):
            if self.router.alive[index]:
                stats, served, version, adapters = await self._call(index, 'status')
                statuses.append(ReplicaStatus(index, stats.waiting, stats.running, stats.used_slots, served,
                                              version, adapters))
        return statuses

    # -- sampling --
    async def sample(self, inputs: Union[InputLike, Sequence[InputLike]], sampling_params: ParamsLike = None,
                     adapter_name: str = '', *, num_samples: Optional[int] = None, return_exceptions: bool = False,
                     session_id: Optional[str] = None) -> Any:
        """See :meth:`AsyncSampler.sample`; a list is spread over the replicas, ``session_id`` pins one.

        Raises:
            ReplicaDiedError: the replica serving an item died (and ``retry`` is off).
        """
        params = coerce_params(sampling_params, num_samples)
        self._check_adapter(adapter_name)
        items = [inputs] if isinstance(inputs, Mapping) else list(inputs)
        results = await self._sample_items(items, params, adapter_name, session_id)
        if isinstance(inputs, Mapping):
            results = results[:1]
        for result in results:
            if isinstance(result, BaseException) and (isinstance(inputs, Mapping) or not return_exceptions):
                raise result
        return results[0] if isinstance(inputs, Mapping) else results

    async def stream(self, inputs: InputLike, sampling_params: ParamsLike = None, adapter_name: str = '', *,
                     num_samples: Optional[int] = None, session_id: Optional[str] = None) -> AsyncIterator[TokenDelta]:
        """See :meth:`AsyncSampler.stream`: deltas travel through a Ray streaming generator.

        Leaving the loop cancels the remote generator, which aborts the request in the replica's engine.
        """
        import ray

        params = coerce_params(sampling_params, num_samples)
        self._check_adapter(adapter_name)
        index = await self._route(params.num_samples, session_id)
        generator = self.actors[index].stream.options(num_returns='streaming').remote(
            inputs, params, adapter_name, self.coalesce_s)
        finished = False
        try:
            async for ref in generator:
                for delta in await self._resolve(index, ref):
                    yield delta
            finished = True
        finally:
            self.router.done(index, params.num_samples)
            if not finished:
                ray.cancel(generator)

    # -- adapters and weights: sent to every replica, logged for restarts --
    async def add_adapter(self, name: str, source: AdapterSource,
                          tensors: Optional[Mapping[str, Any]] = None) -> None:
        import ray

        spec = await asyncio.to_thread(load_adapter, name, source, tensors)
        async with self._model_lock:
            op = _Op('add_adapter', (name, spec.config, ray.put(spec.tensors)), adapter=name)
            await self._broadcast(op)
            self._log = [o for o in self._log if o.adapter != name] + [op]

    async def remove_adapter(self, name: str) -> None:
        async with self._model_lock:
            self._check_adapter(name)
            await self._broadcast(_Op('remove_adapter', (name,), adapter=name))
            self._log = [o for o in self._log if o.adapter != name]

    def list_adapters(self) -> list[str]:
        return [o.adapter for o in self._log if o.method == 'add_adapter' and o.adapter is not None]

    @property
    def weight_version(self) -> int:
        return self._version

    async def update_weights(self, weights: NamedTensors, *, adapter_name: Optional[str] = None,
                             version: Optional[int] = None) -> int:
        """See :meth:`AsyncSampler.update_weights`: the tensors go to the object store once, then to every
        replica, which all end on the same version."""
        import ray

        async with self._model_lock:
            if adapter_name:
                self._check_adapter(adapter_name)
            new_version = next_version(self._version, version)
            tensors = await asyncio.to_thread(_materialize, weights)
            op = _Op('update_weights', (ray.put(tensors), adapter_name, new_version), adapter=adapter_name,
                     names=frozenset(tensors))
            await self._broadcast(op)
            covered = [o for o in self._log if o.method == 'update_weights' and o.adapter == adapter_name
                       and o.names <= op.names]
            self._log = [o for o in self._log if o not in covered] + [op]
            self._version = new_version
            return new_version

    async def pause(self, mode: PauseMode = 'abort') -> None:
        if mode not in PAUSE_MODES:
            raise InvalidRequestError(f'pause mode must be one of {PAUSE_MODES}, got {mode!r}')
        await self._broadcast(_Op('pause', (mode,)))
        self._paused = mode

    async def resume(self) -> None:
        await self._broadcast(_Op('resume', ()))
        self._paused = None

    async def sleep(self, level: int = 1) -> None:
        await self._broadcast(_Op('sleep', (level,)))

    async def wake_up(self) -> None:
        await self._broadcast(_Op('wake_up', ()))

    # -- internals --
    def _check_adapter(self, name: str) -> None:
        if name and name not in self.list_adapters():
            loaded = ', '.join(map(repr, self.list_adapters())) or 'none'
            raise AdapterNotFoundError(f'adapter {name!r} is not loaded (loaded: {loaded})')

    async def _launch(self, index: int) -> Any:
        import ray

        actor = ray.remote(SamplerActor).options(**self.group.actor_options(index * self.mesh.tp_size)).remote(
            self.model_id, self.engine_kind, self.engine_args, self._template_spec)
        await _unwrapped(actor.start.remote())
        for op in self._log:
            await _unwrapped(getattr(actor, op.method).remote(*op.args))
        if self._paused is not None:
            await _unwrapped(actor.pause.remote(self._paused))
        return actor

    async def _sample_items(self, items: list[Any], params: Any, adapter_name: str,
                            session_id: Optional[str]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        work = params.num_samples
        if session_id is not None:
            assignment = [await self._route(work * len(items), session_id)] * len(items)
        else:
            assignment = [await self._route(work) for _ in items]
        chunks: dict[int, list[int]] = {}
        for position, index in enumerate(assignment):
            chunks.setdefault(index, []).append(position)
        await asyncio.gather(*(self._sample_chunk(index, positions, items, params, adapter_name, results)
                               for index, positions in chunks.items()))
        return results

    async def _sample_chunk(self, index: int, positions: list[int], items: list[Any], params: Any,
                            adapter_name: str, results: list[Any]) -> None:
        work = params.num_samples * len(positions)
        try:
            chunk = await self._call(index, 'sample', [items[p] for p in positions], params, adapter_name, True)
        except ReplicaDiedError as exc:
            if not self.retry:
                chunk = [exc] * len(positions)
            else:
                retried = await self._sample_items([items[p] for p in positions], params, adapter_name, None)
                chunk = retried
        finally:
            self.router.done(index, work)
        for position, result in zip(positions, chunk):
            results[position] = result

    async def _route(self, work: int, session_id: Optional[str] = None) -> int:
        while True:
            try:
                return self.router.pick(work, session_id)
            except LookupError:  # every replica is down: wait for one to come back
                if not self._restarts:
                    raise ReplicaDiedError('every replica is down') from None
                await asyncio.wait(list(self._restarts.values()), return_when=asyncio.FIRST_COMPLETED)

    async def _broadcast(self, op: _Op) -> None:
        live = [i for i in range(len(self.actors)) if self.router.alive[i]]
        outcomes = await asyncio.gather(*(self._call(i, op.method, *op.args) for i in live), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ReplicaDiedError)]
        if errors:
            raise errors[0]

    async def _call(self, index: int, method: str, *args: Any) -> Any:
        return await self._resolve(index, getattr(self.actors[index], method).remote(*args))

    async def _resolve(self, index: int, ref: Any) -> Any:
        """``await ref``; cancelling cancels the remote call; a dead actor -> ReplicaDiedError + restart."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return await _unwrapped(ref)
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except RayActorError as exc:
            self._replace(index)
            raise ReplicaDiedError(f'replica {index} died: {exc.__class__.__name__}') from exc

    def _replace(self, index: int) -> None:
        if index in self._restarts or not self.actors:
            return
        self.router.alive[index] = False
        self._restarts[index] = asyncio.create_task(self._restart(index))

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


def _materialize(weights: NamedTensors) -> dict[str, Any]:
    try:
        return dict(named_tensors(weights))
    except TwinkleAsyncError:
        raise
    except Exception as exc:
        raise WeightUpdateError(f'reading the new weights failed midway ({exc!r}); nothing was applied') from exc


async def _close_actor(ray: Any, actor: Any) -> None:
    try:
        await asyncio.wait_for(_unwrapped(actor.close.remote()), 60)
    except Exception:  # dead or stuck: killing it below is the answer either way
        pass
    ray.kill(actor, no_restart=True)
