"""``ReplicaEngine``: ``dp_size`` engines in Ray actors behind the ordinary :class:`Engine` protocol.

A request goes to the replica with the least work in flight (a ``session_id`` keeps a conversation on one
replica); its outputs come back through a Ray streaming generator. Adapters and weight updates go to every replica,
tensors put in the object store once; an update is one transaction across replicas (staged everywhere, then
committed everywhere, or discarded everywhere). A replica that dies is restarted in its bundle and replays the
adapters and committed updates before it is routed to again (:class:`ReplicaSet`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, Mapping, Optional

from twinkle_async.adapters import AdapterSpec
from twinkle_async.engines.base import CacheKind, EngineOutput, EngineRequest, EngineStats, PauseMode
from twinkle_async.engines.pending import PendingIds
from twinkle_async.errors import ConfigurationError, ReplicaDiedError, WeightUpdateError
from twinkle_async.mesh import DeviceMesh
from twinkle_async.ray.cluster import ReservedGroup, reserved_group
from twinkle_async.ray.engine_actor import EngineInfo
from twinkle_async.ray.replicas import Op, ReplicaSet, ReplicaStatus
from twinkle_async.transfer.receiver import StreamedWeights
from twinkle_async.weights import NamedTensors, named_tensors, stage_update

__all__ = ['ReplicaEngine', 'ReplicaLayout', 'ReplicaStatus']


@dataclass(frozen=True)
class ReplicaLayout:
    """Where a sampler's replicas run: ``mesh.dp_size`` replicas, one per worker of a reserved group.

    ``retry``: resend a request whose replica died (see :class:`ReplicaEngine`). ``coalesce_s``: how long a
    replica gathers a request's outputs into one Ray item.
    """

    group: ReservedGroup
    mesh: DeviceMesh
    tp_size: int
    retry: bool = False
    coalesce_s: float = 0.005

    @classmethod
    def plan(cls, remote_group: str, mesh: DeviceMesh, engine: str, retry: bool = False,
             coalesce_s: float = 0.005) -> ReplicaLayout:
        """Raises ConfigurationError: ``remote_group`` is not reserved, or the mesh does not fit it."""
        group = reserved_group(remote_group)
        tp_size = replica_tp_size(mesh, group.workers, group.devices_per_worker, engine, remote_group)
        return cls(group, mesh, tp_size, retry, coalesce_s)


class ReplicaEngine:
    """The replicas of a :class:`ReplicaLayout` as one engine (build with :meth:`create`).

    A request whose replica dies fails with :class:`ReplicaDiedError`; with ``retry`` (the layout's, settable) it
    is resent to another replica when none of its outputs had come back yet, and the error says ``resendable``
    otherwise (the sampler then samples the whole request again; a stream cannot, its first tokens were already
    yielded).
    """

    def __init__(self, replicas: ReplicaSet, tokenizer: Any, info: EngineInfo, layout: ReplicaLayout) -> None:
        self.replicas, self.tokenizer, self.layout = replicas, tokenizer, layout
        self.retry = layout.retry
        self.vocab_size, self.max_model_len, self.max_logprobs = info.vocab_size, info.max_model_len, info.max_logprobs
        self.logprobs_mode = info.logprobs_mode
        self._version = 0
        self._adapters: list[str] = []
        self._placed: dict[str, int] = {}  # request id -> the replica serving it
        self._in_flight = PendingIds()  # requests whose outputs have not all come back
        self._staged: Optional[tuple[Any, str, frozenset[str]]] = None

    @classmethod
    async def create(cls, layout: ReplicaLayout, model_id: str, model_dir: Path, kind: str,
                     engine_args: Mapping[str, Any]) -> ReplicaEngine:
        """Start every replica (in parallel; each resolves ``model_id`` itself) and load the tokenizer here.

        Raises:
            ConfigurationError: the tokenizer cannot be loaded. Any error of the replicas' engine creation.
        """
        replicas = ReplicaSet(layout.group, layout.mesh, (model_id, kind, dict(engine_args)))
        trust = bool(engine_args.get('trust_remote_code', False))
        tokenizer, infos = await asyncio.gather(asyncio.to_thread(_load_tokenizer, model_dir, trust), replicas.start())
        return cls(replicas, tokenizer, infos[0], layout)

    # -- requests --
    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream ``request``'s outputs from one replica; closing the iterator aborts it there.

        Raises:
            ReplicaDiedError: its replica died (``resendable`` when ``retry`` is on and outputs had come back).
        """
        work = request.params.num_samples
        self._in_flight.add(request.request_id)
        try:
            async with contextlib.aclosing(self._outputs(request, work)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self._in_flight.discard(request.request_id)

    async def _outputs(self, request: EngineRequest, work: int) -> AsyncGenerator[EngineOutput, None]:
        """``request``'s outputs from a routed replica, resent once more when its replica died first (``retry``)."""
        while True:
            index = await self.replicas.route(work, request.session_id)
            self._placed[request.request_id] = index
            received = False
            try:
                async with contextlib.aclosing(self._remote_outputs(index, request)) as batches:
                    async for outputs in batches:
                        received = True
                        for output in outputs:
                            yield output
                return
            except ReplicaDiedError as exc:
                if not self.retry or received:
                    exc.resendable = self.retry
                    raise
            finally:
                del self._placed[request.request_id]
                self.replicas.router.done(index, work)

    async def _remote_outputs(self, index: int, request: EngineRequest) -> AsyncGenerator[list[EngineOutput], None]:
        import ray
        from ray.exceptions import RayActorError

        actor = self.replicas.actors[index]
        generator = actor.generate.options(num_returns='streaming').remote(request, self.layout.coalesce_s)
        finished = False
        try:
            async for ref in generator:
                yield await self.replicas.resolve(index, ref)
            finished = True
        except RayActorError as exc:  # raised by the generator itself when the actor dies between items
            raise self.replicas.died(index, exc) from exc
        finally:
            if not finished:  # abort it before the counters are read again, then end the remote generator
                with contextlib.suppress(ReplicaDiedError):
                    await self.replicas.call(index, 'abort', request.request_id)
                ray.cancel(generator)

    async def abort(self, request_id: str) -> None:
        index = self._placed.get(request_id)
        if index is not None:
            try:
                await self.replicas.call(index, 'abort', request_id)
            except ReplicaDiedError:
                pass  # its outputs end with that error

    async def stats(self) -> EngineStats:
        """The live replicas' counters added up (``kv_usage``: their mean)."""
        stats: list[EngineStats] = await asyncio.gather(*(self.replicas.call(i, 'stats') for i in self.replicas.live))
        if not stats:
            return EngineStats(0, 0, 0)
        return EngineStats(
            waiting=sum(s.waiting for s in stats), running=sum(s.running for s in stats),
            used_slots=sum(s.used_slots for s in stats), kv_usage=sum(s.kv_usage for s in stats) / len(stats),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in stats), steps=sum(s.steps for s in stats),
            aborted=sum(s.aborted for s in stats), preemptions=sum(s.preemptions for s in stats))

    async def replica_status(self) -> list[ReplicaStatus]:
        """What every live replica reports (dead ones are being restarted and left out)."""
        return await self.replicas.status()

    # -- model state: on every replica, recorded for restarts --
    @property
    def weight_version(self) -> int:
        """The version every replica has committed."""
        return self._version

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def add_adapter(self, spec: AdapterSpec) -> None:
        import ray

        await self._everywhere(Op('add_adapter', (ray.put(spec),), adapter=spec.name))
        self._adapters = [name for name in self._adapters if name != spec.name] + [spec.name]

    async def remove_adapter(self, name: str) -> None:
        await self._everywhere(Op('remove_adapter', (name,), adapter=name))
        self._adapters.remove(name)

    async def stage_weights(self, weights: NamedTensors, adapter_name: str) -> None:
        """Stage the update on every replica, or on none: tensors put in the object store once; an update streamed by
        a ``WeightSender`` is received by each replica itself (one rank each), and the first keeps a copy in the
        object store for replicas that restart later.

        Raises:
            WeightUpdateError: ``weights`` raised midway, or a replica could not stage them (named); every
                replica still serves the previous version and holds nothing staged.
        """
        import ray

        await self.discard_weights()
        live = self.replicas.live
        if isinstance(weights, StreamedWeights):
            parts = weights.split(len(live))
            staged = await self.replicas.stage({i: (part, adapter_name, n == 0)
                                                for n, (i, part) in enumerate(zip(live, parts))})
            ref, names = staged[0][0], frozenset(meta.name for bucket in weights.header.buckets for meta in bucket)
        else:
            tensors = await stage_update(lambda: dict(named_tensors(weights)))
            ref, names = ray.put(tensors), frozenset(tensors)
            await self.replicas.stage({i: (ref, adapter_name) for i in live})
        self._staged = (ref, adapter_name, names)

    async def commit_weights(self, version: int) -> None:
        """Commit on every replica that staged the update; one whose commit fails is restarted and replays it."""
        if self._staged is None:
            raise WeightUpdateError('no weight update is staged')
        (ref, adapter, names), self._staged = self._staged, None
        await self.replicas.commit(Op('apply_update', (ref, adapter, version), adapter=adapter, names=names),
                                   version)
        self._version = version

    async def discard_weights(self) -> None:
        if self._staged is not None:
            self._staged = None
            await self.replicas.discard()

    async def pause(self, mode: PauseMode) -> None:
        """Every replica's; 'wait' returns once the outputs of the requests in flight have all come back here."""
        in_flight = set(self._in_flight.ids)
        await self.replicas.broadcast(Op('pause', (mode,)))
        self.replicas.paused = mode
        if mode == 'wait':
            await self._in_flight.gone(in_flight)

    async def resume(self) -> None:
        await self.replicas.broadcast(Op('resume', ()))
        self.replicas.paused = None

    async def sleep(self, level: int) -> None:
        await self.replicas.broadcast(Op('sleep', (level,)))

    async def wake_up(self) -> None:
        await self.replicas.broadcast(Op('wake_up', ()))

    async def reset_cache(self, kind: CacheKind) -> None:
        await self.replicas.broadcast(Op('reset_cache', (kind,)))

    async def close(self) -> None:
        """Close every replica's engine and end its actor."""
        await self.replicas.close()

    async def _everywhere(self, op: Op) -> None:
        await self.replicas.broadcast(op)
        self.replicas.record(op)


def replica_tp_size(mesh: DeviceMesh, workers: int, devices: int, engine: str, group: str) -> int:
    """Tensor-parallel size of each replica: ``mesh.tp_size``, or all of a multi-device worker's devices (vLLM).

    Raises:
        ConfigurationError: more replicas than the group has workers, or a ``tp_size`` other than 1 or the
            worker's device count.
    """
    if mesh.dp_size > workers:
        raise ConfigurationError(f'dp_size={mesh.dp_size} replicas need {mesh.dp_size} workers; group {group!r} has '
                                 f'{workers} (ranks / gpus_per_worker)')
    if mesh.tp_size not in (1, devices):
        raise ConfigurationError(f'tp_size={mesh.tp_size}: a replica runs on one worker of group {group!r}, which has '
                                 f'{devices} device(s): set DeviceGroup(gpus_per_worker={mesh.tp_size})')
    return mesh.tp_size if mesh.tp_size > 1 or engine == 'torch' else devices


def _load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

