"""``RemoteSampler``: the :class:`AsyncSampler` API over ``dp_size`` replica actors on Ray.

Requests go to the replica with the least work in flight (a list is spread item by item, one call per
replica; a ``session_id`` keeps a conversation on one replica). Adapters and weight updates go to every
replica, tensors put in the object store once (see :class:`ReplicaSet` for restarts).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Mapping, Optional, Sequence, Union

from twinkle_async.adapters import BASE_MODEL, AdapterSource, load_adapter
from twinkle_async.data_format.outputs import TokenDelta
from twinkle_async.engines.base import CacheKind, PauseMode
from twinkle_async.errors import (
    ConfigurationError,
    NotSupportedError,
    ReplicaDiedError,
    TwinkleAsyncError,
    WeightUpdateError,
)
from twinkle_async.mesh import DeviceMesh, with_tensor_parallel
from twinkle_async.models import DEFAULT_MODEL, resolve_model
from twinkle_async.multimodal.processing import load_image_processor
from twinkle_async.ray.cluster import reserved_group
from twinkle_async.ray.replicas import Op, ReplicaSet, ReplicaStatus
from twinkle_async.sampler.async_sampler import AsyncSampler, InputLike, check_pause_mode, streamable
from twinkle_async.sampler.requests import ParamsLike, as_items, coerce_params
from twinkle_async.template import Template, TemplateSpec, build_template
from twinkle_async.weights import NamedTensors, named_tensors, next_version

__all__ = ['RemoteSampler', 'ReplicaStatus']


class RemoteSampler(AsyncSampler):
    """``AsyncSampler(..., remote_group=name, device_mesh=DeviceMesh.from_sizes(dp_size=N, tp_size=T))``.

    Args:
        remote_group: a group reserved with ``initialize('ray', groups=[DeviceGroup(name, ranks, ...)])``;
            each of the ``dp_size`` replicas takes one of its workers (``gpus_per_worker`` devices), so
            ``tp_size`` is 1 or ``gpus_per_worker`` (vLLM replicas of a multi-device worker are tensor parallel
            over its devices by default, as in Twinkle).
        retry: resend requests of a replica that died to another one (else they fail with
            :class:`ReplicaDiedError`). Streams are never resent: their first tokens were already yielded.
        coalesce_s: how long a replica gathers stream deltas into one Ray item.
    """

    def __init__(self, model_id: str = DEFAULT_MODEL, engine: str = 'torch',
                 engine_args: Optional[Mapping[str, Any]] = None, template: Optional[TemplateSpec] = None, *,
                 remote_group: str, device_mesh: Optional[DeviceMesh] = None, retry: bool = False,
                 coalesce_s: float = 0.005) -> None:
        super().__init__(model_id, engine, engine_args, template)
        group, mesh = reserved_group(remote_group), device_mesh or DeviceMesh()
        tp_size = replica_tp_size(mesh, group.workers, group.devices_per_worker, engine, remote_group)
        with_tensor_parallel(self.engine_args, engine, tp_size)
        self.retry, self.coalesce_s = retry, coalesce_s
        self.replicas = ReplicaSet(group, mesh, (model_id, engine, self.engine_args, template))
        self._version = 0
        self._local_tokenizer: Any = None

    async def start(self) -> None:
        """Start every replica (in parallel) and wait until all serve; load the tokenizer here for ``template``."""
        if self._local_tokenizer is None:
            self.model_dir = await asyncio.to_thread(resolve_model, self.model_id)
            trust = bool(self.engine_args.get('trust_remote_code', False))
            self._local_tokenizer = await asyncio.to_thread(_load_tokenizer, self.model_dir, trust)
            self._images = await asyncio.to_thread(load_image_processor, self.model_dir, trust)
            self._template = build_template(self._template_spec or 'default', self._text_or_images())
        await self.replicas.start()

    async def close(self) -> None:
        """Close every replica's engine and end its actor."""
        await self.replicas.close()

    def _text_or_images(self) -> Any:
        return self._images or self._local_tokenizer

    @property
    def engine(self) -> Any:
        raise NotSupportedError('a remote sampler has no local engine: see replica_status()')

    @property
    def template(self) -> Template:
        """A local copy of the replicas' template (``.tokenizer``, ``.encode``, ``.decode``)."""
        if self._template is None:
            raise ConfigurationError('the sampler is not started: use "async with" or await start()')
        return self._template

    def set_template(self, template: TemplateSpec, **kwargs: Any) -> None:
        """See :meth:`AsyncSampler.set_template`: checked and built here, then sent to every replica (and to
        restarted ones), taking effect before later requests."""
        model_id = kwargs.pop('model_id', None)
        self._check_template_model(model_id)
        self._template = build_template(template, self._text_or_images(), **kwargs)
        op = Op('set_template', (template, kwargs))
        self.replicas.record(op)
        for actor in self.replicas.actors:
            getattr(actor, op.method).remote(*op.args)

    async def replica_status(self) -> list[ReplicaStatus]:
        """What every live replica reports (dead ones are being restarted and left out)."""
        return await self.replicas.status()

    # -- sampling --
    async def sample(self, inputs: Union[InputLike, Sequence[InputLike]], sampling_params: ParamsLike = None,
                     adapter_name: str = '', adapter_path: Optional[str] = None, *, num_samples: Optional[int] = None,
                     return_exceptions: bool = False, session_id: Optional[str] = None,
                     timeout: Optional[float] = None) -> Any:
        """See :meth:`AsyncSampler.sample`; a list is spread over the replicas, ``session_id`` pins one.

        Raises:
            ReplicaDiedError: the replica serving an item died (and ``retry`` is off).
        """
        params = coerce_params(sampling_params, num_samples)
        adapter_name = await self._adapter_for(adapter_name, adapter_path)
        self._check_adapter(adapter_name)
        items, one = as_items(inputs)
        results = await self._sample_items(items, params, adapter_name, session_id, timeout)
        for result in results:
            if isinstance(result, BaseException) and (one or not return_exceptions):
                raise result
        return results[0] if one else results

    async def stream(self, inputs: InputLike, sampling_params: ParamsLike = None, adapter_name: str = '',
                     adapter_path: Optional[str] = None, *, num_samples: Optional[int] = None,
                     session_id: Optional[str] = None, timeout: Optional[float] = None) -> AsyncIterator[TokenDelta]:
        """See :meth:`AsyncSampler.stream`: deltas travel through a Ray streaming generator.

        Leaving the loop cancels the remote generator, which aborts the request in the replica's engine.
        """
        import ray
        from ray.exceptions import RayActorError

        params = streamable(coerce_params(sampling_params, num_samples))
        adapter_name = await self._adapter_for(adapter_name, adapter_path)
        self._check_adapter(adapter_name)
        index = await self.replicas.route(params.num_samples, session_id)
        generator = self.replicas.actors[index].stream.options(num_returns='streaming').remote(
            inputs, params, adapter_name, timeout, self.coalesce_s)
        finished = False
        try:
            async for ref in generator:
                for delta in await self.replicas.resolve(index, ref):
                    yield delta
            finished = True
        except RayActorError as exc:  # raised by the generator itself when the actor dies between items
            raise self.replicas.died(index, exc) from exc
        finally:
            self.replicas.router.done(index, params.num_samples)
            if not finished:
                ray.cancel(generator)

    # -- adapters and weights: sent to every replica, recorded for restarts --
    async def add_adapter(self, name: str, source: AdapterSource,
                          tensors: Optional[Mapping[str, Any]] = None) -> None:
        import ray

        spec = await asyncio.to_thread(load_adapter, name, source, tensors)
        async with self._model_lock:
            await self._apply(Op('add_adapter', (name, spec.config, ray.put(spec.tensors)), adapter=name))

    async def remove_adapter(self, name: str) -> None:
        async with self._model_lock:
            self._check_adapter(name)
            await self._apply(Op('remove_adapter', (name,), adapter=name))

    def list_adapters(self) -> list[str]:
        return [o.adapter for o in self.replicas.log if o.method == 'add_adapter' and o.adapter is not None]

    @property
    def weight_version(self) -> int:
        return self._version

    async def update_weights(self, weights: NamedTensors, *, adapter_name: Optional[str] = None,
                             version: Optional[int] = None) -> int:
        """See :meth:`AsyncSampler.update_weights`: the tensors go to the object store once, then to every
        replica as one transaction (``ReplicaSet.update``): all end on the new version, or all stay on the old.

        Raises:
            WeightUpdateError: a replica could not stage the update (named); every replica still serves the
                previous version."""
        import ray

        async with self._model_lock:
            self._check_adapter(adapter_name or BASE_MODEL)
            new_version = next_version(self._version, version)
            tensors = await asyncio.to_thread(_materialize, weights)
            await self.replicas.update(Op('update_weights', (ray.put(tensors), adapter_name, new_version),
                                          adapter=adapter_name, names=frozenset(tensors)))
            self._version = new_version
            return new_version

    async def pause(self, mode: PauseMode = 'abort') -> None:
        check_pause_mode(mode)
        await self.replicas.broadcast(Op('pause', (mode,)))
        self.replicas.paused = mode

    async def resume(self) -> None:
        await self.replicas.broadcast(Op('resume', ()))
        self.replicas.paused = None

    async def sleep(self, level: int = 1) -> None:
        await self.replicas.broadcast(Op('sleep', (level,)))

    async def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        await self.replicas.broadcast(Op('wake_up', (list(tags) if tags else None,)))

    async def reset_cache(self, kind: CacheKind) -> None:
        """See :meth:`AsyncSampler.reset_cache`: on every replica."""
        await self.replicas.broadcast(Op('reset_cache', (kind,)))

    # -- internals --
    async def _apply(self, op: Op) -> None:
        await self.replicas.broadcast(op)
        self.replicas.record(op)

    async def _sample_items(self, items: list[Any], params: Any, adapter_name: str, session_id: Optional[str],
                            timeout: Optional[float]) -> list[Any]:
        work = params.num_samples
        if session_id is not None:
            assignment = [await self.replicas.route(work * len(items), session_id)] * len(items)
        else:
            assignment = [await self.replicas.route(work) for _ in items]
        chunks: dict[int, list[int]] = {}
        for position, index in enumerate(assignment):
            chunks.setdefault(index, []).append(position)
        results: list[Any] = [None] * len(items)
        await asyncio.gather(*(self._sample_chunk(index, positions, items, params, adapter_name, timeout, results)
                               for index, positions in chunks.items()))
        return results

    async def _sample_chunk(self, index: int, positions: list[int], items: list[Any], params: Any,
                            adapter_name: str, timeout: Optional[float], results: list[Any]) -> None:
        chunk_items = [items[p] for p in positions]
        try:
            chunk = await self.replicas.call(index, 'sample', chunk_items, params, adapter_name, True, timeout)
        except ReplicaDiedError as exc:
            chunk = [exc] * len(positions) if not self.retry else \
                await self._sample_items(chunk_items, params, adapter_name, None, timeout)
        finally:
            self.replicas.router.done(index, params.num_samples * len(positions))
        for position, result in zip(positions, chunk):
            results[position] = result


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


def _load_tokenizer(model_dir: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _materialize(weights: NamedTensors) -> dict[str, Any]:
    try:
        return dict(named_tensors(weights))
    except TwinkleAsyncError:
        raise
    except Exception as exc:
        raise WeightUpdateError(f'reading the new weights failed midway ({exc!r}); nothing was applied') from exc
