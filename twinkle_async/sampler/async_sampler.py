"""``AsyncSampler``: the engine-agnostic asyncio core (inputs -> engine requests -> responses/deltas)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Mapping, Optional, Sequence, Union

from twinkle_async.adapters import BASE_MODEL, AdapterSource, load_adapter
from twinkle_async.data_format.outputs import SampleResponse, TokenDelta
from twinkle_async.engines.base import (
    CACHE_KINDS,
    PAUSE_MODES,
    CacheKind,
    Engine,
    EngineOutput,
    EngineRequest,
    PauseMode,
    apply_update,
)
from twinkle_async.engines.factory import ENGINE_KINDS, create_engine
from twinkle_async.errors import (
    AdapterNotFoundError,
    ConfigurationError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ReplicaDiedError,
    TwinkleAsyncError,
)
from twinkle_async.infra import check_local_mesh
from twinkle_async.mesh import DeviceMesh, with_tensor_parallel
from twinkle_async.models import DEFAULT_MODEL, resolve_model
from twinkle_async.multimodal.processing import ImageProcessor, load_image_processor
from twinkle_async.ray.replica_engine import ReplicaEngine, ReplicaLayout
from twinkle_async.sampler.adapter_paths import AdapterPaths
from twinkle_async.sampler.admission import Admission
from twinkle_async.sampler.groups import Accept, sample_groups
from twinkle_async.sampler.requests import ParamsLike, as_items, coerce_params, encode_input, resolve_params
from twinkle_async.sampler.responses import LogprobContract, ResponseBuilder, empty_response, to_delta
from twinkle_async.sampler.rollouts import Rollouts
from twinkle_async.template import Template, TemplateSpec, build_template
from twinkle_async.transfer import StreamedWeights, WeightChannel
from twinkle_async.weights import NamedTensors, next_version

__all__ = ['AsyncSampler', 'WAKE_UP_TAGS']

InputLike = Mapping[str, Any]
WAKE_UP_TAGS = ('weights', 'kv_cache')


class AsyncSampler:
    """Sample rollouts with ``await sampler.sample(...)`` or ``async for d in sampler.stream(...)``.

    Args:
        model_id: a local HF directory, ``'smollm2-135m-instruct'`` (default) or a hub id.
        engine: ``'torch'`` (native continuous batching) or ``'vllm'``.
        engine_args: engine options (``dtype``, ``max_model_len``, ``max_num_seqs``, ``seed``, ...).
        template: a template name, class or instance; the model's chat template by default.
        max_pending_requests: at most this many requests in flight (``None``: no bound); past it a new
            request fails at once with :class:`OverloadedError` (each item of a list counts).
        remote_group: run the engine as ``device_mesh.dp_size`` Ray actors in this group (reserved with
            ``initialize('ray', groups=[DeviceGroup(...)])``), each on one of its workers: the engine is then a
            :class:`~twinkle_async.ray.replica_engine.ReplicaEngine`; templates and responses stay here.
        device_mesh: with ``remote_group``, ``dp_size`` replicas of ``tp_size`` ranks each (vLLM replicas of a
            multi-device worker are tensor parallel over its devices by default, as in Twinkle).
        retry: with ``remote_group``, sample a request again when its replica dies (streams only before their
            first token); else it fails with :class:`ReplicaDiedError`.
        coalesce_s: with ``remote_group``, how long a replica gathers a request's outputs into one Ray item.
        max_staleness: no returned token is more than this many weight versions older than the version current
            when it is returned (``None``: no bound); see ``twinkle_async.sampler.rollouts`` and ``docs/rl.md``.

    Use as ``async with AsyncSampler(...) as sampler:`` (or ``await start()`` / ``await close()``).
    Any number of tasks may sample concurrently; the engine batches them together.
    """

    def __init__(self, model_id: str = DEFAULT_MODEL, engine: str = 'torch',
                 engine_args: Optional[Mapping[str, Any]] = None, template: Optional[TemplateSpec] = None, *,
                 device_mesh: Optional[DeviceMesh] = None, remote_group: Optional[str] = None,
                 max_pending_requests: Optional[int] = None, retry: bool = False, coalesce_s: float = 0.005,
                 max_staleness: Optional[int] = None) -> None:
        check_local_mesh(device_mesh, remote_group)
        self.admission = Admission(max_pending_requests)
        self.rollouts = Rollouts(max_staleness)
        if engine not in ENGINE_KINDS:
            raise ConfigurationError(f'unknown engine {engine!r}; choose one of {ENGINE_KINDS}')
        self.model_id = model_id
        self.engine_kind = engine
        mesh = device_mesh or DeviceMesh()
        self._layout = None if remote_group is None else \
            ReplicaLayout.plan(remote_group, mesh, engine, retry, coalesce_s)
        tp_size = mesh.tp_size if self._layout is None else self._layout.tp_size
        self.engine_args = with_tensor_parallel(dict(engine_args or {}), engine, tp_size)
        self._template_spec = template
        self._engine: Optional[Engine] = None
        self._template: Optional[Template] = None
        self._images: Optional[ImageProcessor] = None
        self._model_lock = asyncio.Lock()  # adapter and weight changes happen one at a time
        self._adapter_paths = AdapterPaths()
        self._weight_channel: Optional[WeightChannel] = None
        self.model_dir: Optional[Path] = None

    async def __aenter__(self) -> AsyncSampler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Resolve the model and start the engine (idempotent).

        Raises:
            ModelNotFoundError, EngineArgsError, ConfigurationError: the sampler cannot be built.
        """
        if self._engine is not None:
            return
        self.model_dir = await asyncio.to_thread(resolve_model, self.model_id)
        if self._layout is None:
            self._engine = await create_engine(self.engine_kind, self.model_dir, self.engine_args)
        else:
            self._engine = await ReplicaEngine.create(self._layout, self.model_id, self.model_dir, self.engine_kind,
                                                      self.engine_args)
        self._images = await asyncio.to_thread(load_image_processor, self.model_dir,
                                               bool(self.engine_args.get('trust_remote_code')))
        self._template = build_template(self._template_spec or 'default', self._text_or_images())

    async def close(self) -> None:
        """Stop the engine; open requests fail with ``EngineDeadError``."""
        if self._weight_channel is not None:
            channel, self._weight_channel = self._weight_channel, None
            await channel.close()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ConfigurationError('the sampler is not started: use "async with" or await start()')
        return self._engine

    @property
    def template(self) -> Template:
        """The template in use: ``.tokenizer``, ``.encode(trajectory)``, ``.decode(ids)``."""
        self.engine  # noqa: B018 - raises when not started
        assert self._template is not None
        return self._template

    def set_template(self, template: TemplateSpec, **kwargs: Any) -> None:
        """Use another chat template, in Twinkle's form: ``set_template('Template', model_id=..., enable_thinking=False,
        max_length=..., truncation_strategy=..., default_system=..., use_chat_template=...)``.

        Args:
            template: a registered name ('Template', 'default', 'chatml', Twinkle's family names such as
                'Qwen3_5Template' — all but 'chatml' use the model's own chat template), a class or an instance.
            kwargs: the template's arguments (see :class:`~twinkle_async.template.Template`); other keywords are
                chat-template variables. ``model_id``, if given, must name this sampler's model.

        Raises:
            TemplateNotFoundError: an unknown name (the known ones are listed).
            ConfigurationError: ``model_id`` names another model, or an invalid template argument.
        """
        self._check_template_model(kwargs.pop('model_id', None))
        self._template = build_template(template, self._text_or_images(), **kwargs)

    def _text_or_images(self) -> Any:
        """What templates are built on: the model's image processor (vision-language models), else its tokenizer."""
        return self._images or self.engine.tokenizer

    def _check_template_model(self, model_id: Optional[str]) -> None:
        if model_id is None or model_id == self.model_id:
            return
        if resolve_model(model_id) != resolve_model(self.model_id):
            raise ConfigurationError(f'set_template(model_id={model_id!r}): this sampler serves {self.model_id!r}; '
                                     "a template must tokenize for the sampler's own model")

    async def sample(self, inputs: Union[InputLike, Sequence[InputLike]], sampling_params: ParamsLike = None,
                     adapter_name: str = '', adapter_path: Optional[str] = None, *,
                     num_samples: Optional[int] = None, return_exceptions: bool = False,
                     session_id: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        """Sample completions for one input (-> ``SampleResponse``) or a list (-> list, in order).

        Each sequence's ``new_input_feature`` is the template's ``concat_input_feature`` of the input: every key of
        the input, ``input_ids`` = prompt + completion, Twinkle's ``labels`` / ``attention_mask`` /
        ``position_ids`` / ``length``, and with ``messages`` an appended assistant message (with parsed
        ``tool_calls``). ``max_tokens=0`` scores the prompt: ``prompt_logprobs`` / ``topk_prompt_logprobs`` and
        empty sequences. The inputs are never modified.

        Args:
            inputs: a ``Trajectory`` (``messages``) or an ``InputFeature`` (``input_ids`` and any other keys), or a
                list.
            sampling_params: ``SamplingParams``, a dict of its fields, or ``None`` for defaults.
            adapter_name: LoRA adapter to sample with ('' for the base model).
            adapter_path: a PEFT adapter directory to sample with: loaded once (under ``adapter_name``, or a name
                derived from the path) and reloaded when its files change.
            num_samples: completions per input (overrides ``sampling_params.num_samples``).
            return_exceptions: for a list, put a failed item's error in its place instead of raising;
                the other items always run to completion.
            session_id: keeps a conversation on one replica of a remote sampler (prefix-cache reuse);
                one engine serves everything locally.
            timeout: seconds; a request still running then is aborted and returns what it has so far
                (stop_reason 'abort'), without raising.

        Raises:
            InvalidRequestError: a bad input or parameter (named in the message).
            OverloadedError: ``max_pending_requests`` requests are in flight already.
            EngineDeadError: the engine died.
        """
        params = coerce_params(sampling_params, num_samples)
        items, one = as_items(inputs)
        adapter_name = await self._adapter_for(adapter_name, adapter_path)
        if one:
            return await self._sample_one(items[0], params, adapter_name, timeout, session_id)
        results = await asyncio.gather(*(self._sample_one(item, params, adapter_name, timeout, session_id)
                                         for item in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not (return_exceptions and isinstance(result, TwinkleAsyncError)):
                raise result
        return results

    async def stream(self, inputs: InputLike, sampling_params: ParamsLike = None, adapter_name: str = '',
                     adapter_path: Optional[str] = None, *, num_samples: Optional[int] = None,
                     session_id: Optional[str] = None, timeout: Optional[float] = None) -> AsyncIterator[TokenDelta]:
        """Yield ``TokenDelta``s of every sample as they are generated (``adapter_path`` as in :meth:`sample`).

        Leaving the loop early (``break``, cancellation, ``aclose()``) aborts the request in the engine.
        Past ``timeout`` seconds the request is aborted: unfinished samples end with finish_reason 'abort'.

        Raises:
            InvalidRequestError: a bad input or parameter (``max_tokens=0`` scores, it has nothing to stream).
            OverloadedError: too many requests in flight. EngineDeadError: the engine died.
        """
        params = streamable(coerce_params(sampling_params, num_samples))
        adapter_name = await self._adapter_for(adapter_name, adapter_path)
        _, request = self._request(inputs, params, adapter_name, session_id)
        if request is None:  # the template's truncation_strategy='delete' dropped the prompt
            return
        engine = self.engine  # the one serving this request, even if the sampler is closed meanwhile
        async with contextlib.aclosing(self._generate(request, timeout)) as outputs:
            async for output in outputs:
                self.rollouts.returned([output.weight_version] * len(output.token_ids), engine.weight_version)
                yield to_delta(output)
        self.rollouts.stream_ended(request.request_id, request.params.num_samples)

    # -- adapters --
    async def add_adapter(self, name: str, source: AdapterSource,
                          tensors: Optional[Mapping[str, Any]] = None) -> None:
        """Load a LoRA adapter (or replace the one called ``name``: its new weights serve at once).

        Args:
            name: what requests pass as ``adapter_name``.
            source: a directory saved by PEFT (``adapter_model.safetensors`` + ``adapter_config.json``),
                or a ``LoraConfig`` / config dict, then with ``tensors`` keyed as PEFT saves them.

        Raises:
            InvalidAdapterError: not safetensors, not LoRA, or it does not fit the model.
            NotSupportedError: the engine was started without LoRA support.
        """
        spec = await asyncio.to_thread(load_adapter, name, source, tensors)
        async with self._model_lock:
            await self._abort_requests_using(name)
            await self.engine.add_adapter(spec)

    async def remove_adapter(self, name: str) -> None:
        """Unload an adapter; requests still using it end with stop_reason 'abort'.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        async with self._model_lock:
            self._check_adapter(name)
            await self._abort_requests_using(name)
            await self.engine.remove_adapter(name)

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return list(self.engine.adapters)

    # -- weights --
    @property
    def weight_version(self) -> int:
        """Version of the weights new tokens are sampled with (0 until the first update)."""
        return self.engine.weight_version

    async def update_weights(self, weights: NamedTensors, *, adapter_name: Optional[str] = None,
                             version: Optional[int] = None) -> int:
        """Replace the base model's weights (or an adapter's) in place with the trainer's.

        All or nothing: every tensor is checked and staged before any is applied; then they are applied
        between two engine steps. Requests in flight go on with the new weights (their KV cache is
        rebuilt) and their tokens say which version sampled them.

        Args:
            weights: a ``name -> tensor`` mapping or an iterable of ``(name, tensor)`` (checkpoint names,
                e.g. a trainer's ``state_dict()``; an adapter's keys as PEFT saves them). Any subset. The
                tensors are read until this returns (a mapping's may be used without a copy).
            adapter_name: update this adapter instead of the base model.
            version: the new version (default: the current one + 1).

        Returns:
            The new version.

        Raises:
            WeightUpdateError: a bad name, shape or dtype, or ``weights`` raised midway; nothing was
                applied and the previous version is still served.
            AdapterNotFoundError: ``adapter_name`` is not loaded.
        """
        async with self._model_lock:
            self._check_adapter(adapter_name or BASE_MODEL)
            new_version = next_version(self.engine.weight_version, version)
            await apply_update(self.engine, weights, adapter_name or BASE_MODEL, new_version)
            for request_id in self.rollouts.stale_requests(new_version):
                await self.engine.abort(request_id)
            return new_version

    async def open_weight_channel(self, host: str = '127.0.0.1', port: int = 0, timeout_s: float = 300.0) -> str:
        """Take weight updates from a trainer in another process: returns the address a
        :class:`~twinkle_async.transfer.WeightSender` connects to (``'host:port'``; port 0 picks a free one).

        Each ``sender.send(weights, version=..., adapter_name=...)`` is applied as ``update_weights``: the tensors
        are broadcast over ``torch.distributed`` (gloo for CPU tensors, NCCL for CUDA ones) straight into every
        engine (each Ray replica is a rank of its own), staged everywhere, then committed, or refused everywhere
        (the sender gets the ``WeightUpdateError``). Updates apply one at a time, in the order sent. Idempotent: a
        second call returns the same address. The channel closes with the sampler.
        """
        self.engine  # noqa: B018 - raises when not started
        if self._weight_channel is None:
            self._weight_channel = WeightChannel(self._apply_streamed, host, port, timeout_s)
        return self._weight_channel.address

    async def _apply_streamed(self, weights: StreamedWeights, adapter_name: Optional[str],
                              version: Optional[int]) -> int:
        return await self.update_weights(weights, adapter_name=adapter_name, version=version)

    def metrics(self) -> dict[str, Any]:
        """Rollout counters (see :class:`~twinkle_async.sampler.rollouts.RolloutMetrics`): tokens generated and
        returned, the staleness of returned tokens, samples restarted or dropped for ``max_staleness``, groups
        aborted or rejected by :meth:`sample_groups`, and the oldest token versions of the requests in flight."""
        return self.rollouts.snapshot()

    async def sample_groups(self, prompts: Sequence[InputLike], sampling_params: ParamsLike = None, *,
                            num_samples: int, accept: Accept, target: int, over_sample: float = 1.5,
                            adapter_name: str = '', timeout: Optional[float] = None) -> list[SampleResponse]:
        """DAPO-style dynamic sampling: sample groups (one prompt x ``num_samples``) until ``target`` are accepted.

        ``ceil(target * over_sample)`` groups run at once, taken from ``prompts`` in order; each finished group's
        ``SampleResponse`` goes to ``accept`` (sync or async; e.g. "the rewards are not all equal"); a rejected
        group's place goes to the next prompt. Once ``target`` groups are accepted, every group still running is
        aborted in the engine and the accepted ones are returned, in the order they were accepted (fewer when the
        prompts run out first). Counters: ``metrics()['aborted_groups']``, ``['rejected_groups']``.

        Raises:
            InvalidRequestError: ``target`` < 1 or ``over_sample`` < 1. Errors of a group or of ``accept`` (the
                other groups are aborted first).
        """
        return await sample_groups(self, prompts, coerce_params(sampling_params, num_samples), accept, target,
                                   over_sample, adapter_name, timeout)

    # -- pausing --
    async def pause(self, mode: PauseMode = 'abort') -> None:
        """Stop generating; requests arriving while paused wait for :meth:`resume`.

        Args:
            mode: 'abort' ends requests in flight (stop_reason 'abort', partial tokens returned);
                'keep' freezes them and goes on with them after ``resume`` (on the weights of then);
                'wait' returns once they have finished.
        """
        check_pause_mode(mode)
        await self.engine.pause(mode)

    async def resume(self) -> None:
        """Generate again: held requests start, kept ones go on."""
        await self.engine.resume()

    async def sleep(self, level: int = 1) -> None:
        """Abort what runs and free memory until :meth:`wake_up`: level 1 the KV cache, level 2 the weights too
        (send them with ``update_weights`` before waking up).

        Raises:
            NotSupportedError: the engine cannot sleep here (vLLM's sleep mode needs a GPU).
        """
        await self.engine.sleep(level)

    async def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Serve again after :meth:`sleep`. ``tags`` (Twinkle's, a subset of 'weights', 'kv_cache') are checked;
        the engine wakes up whole."""
        unknown = sorted(set(tags or ()) - set(WAKE_UP_TAGS))
        if unknown:
            raise InvalidRequestError(f'wake_up tags must be among {WAKE_UP_TAGS}, got {unknown}')
        await self.engine.wake_up()

    async def reset_cache(self, kind: CacheKind) -> None:
        """Empty one of the engine's caches: 'prefix' (cached KV of earlier prompts), 'mm' (processed multimodal
        inputs) or 'encoder' (vision encoder outputs). A no-op where the engine has no such cache (the torch
        engine has a prefix cache on its native runner, and neither of the other two)."""
        if kind not in CACHE_KINDS:
            raise InvalidRequestError(f'cache kind must be one of {CACHE_KINDS}, got {kind!r}')
        await self.engine.reset_cache(kind)

    async def reset_prefix_cache(self) -> None:
        """Twinkle's name: ``reset_cache('prefix')`` (e.g. after a weight sync)."""
        await self.reset_cache('prefix')

    async def reset_mm_cache(self) -> None:
        """Twinkle's name: ``reset_cache('mm')``."""
        await self.reset_cache('mm')

    async def reset_encoder_cache(self) -> None:
        """Twinkle's name: ``reset_cache('encoder')``."""
        await self.reset_cache('encoder')

    async def _adapter_for(self, adapter_name: str, adapter_path: Optional[str]) -> str:
        """The adapter a call samples with; ``adapter_path`` is loaded (or reloaded) first."""
        if adapter_path is None:
            return adapter_name
        return await self._adapter_paths.ensure(adapter_path, adapter_name, self.list_adapters, self.add_adapter)

    async def _abort_requests_using(self, adapter: str) -> None:
        for request_id in self.admission.using(adapter):
            await self.engine.abort(request_id)

    def _check_adapter(self, name: str) -> None:
        if name and name not in self.list_adapters():
            loaded = ', '.join(map(repr, self.list_adapters())) or 'none'
            raise AdapterNotFoundError(f'adapter {name!r} is not loaded (loaded: {loaded})')

    async def _sample_one(self, item: InputLike, params: Any, adapter_name: str, timeout: Optional[float],
                          session_id: Optional[str]) -> SampleResponse:
        engine = self.engine  # the one serving this request, even if the sampler is closed meanwhile
        while True:
            feature, request = self._request(item, params, adapter_name, session_id)
            if request is None:
                return empty_response()
            builder = ResponseBuilder(request.prompt_token_ids, request.params.num_samples,
                                      params.logprobs is not None,
                                      LogprobContract.of(engine.logprobs_mode, request.params),
                                      params.return_sampling_mask)
            try:
                async with contextlib.aclosing(self._generate(request, timeout)) as outputs:
                    async for output in outputs:
                        builder.add(output)
            except ReplicaDiedError as exc:
                if not exc.resendable:
                    raise
                continue
            newest = engine.weight_version
            if not self.rollouts.sample_again(request.request_id, builder.versions, newest):
                self.rollouts.returned([v for sample in builder.versions for v in sample], newest)
                break
        if params.scoring:
            return builder.scored(params.num_samples, feature)
        template = self.template
        return builder.build(lambda tokens: template.concat_input_feature(feature, tokens))

    async def _generate(self, request: EngineRequest, timeout: Optional[float]) -> AsyncGenerator[EngineOutput, None]:
        """The engine's outputs for ``request`` while it holds an admission place; closing this generator early
        (or the timeout) aborts the request."""
        engine = self.engine
        await self.rollouts.wait_to_start(lambda: engine.weight_version)
        with self.admission.admit(engine, request, timeout):
            try:
                async with contextlib.aclosing(engine.generate(request)) as outputs:
                    async for output in outputs:
                        self.rollouts.observe(request.request_id, len(output.token_ids), output.weight_version)
                        yield output
            finally:
                await self.rollouts.release(request.request_id)

    def _request(self, item: InputLike, params: Any, adapter_name: str,
                 session_id: Optional[str] = None) -> tuple[Any, Optional[EngineRequest]]:
        """The input's prompt feature and the engine request for it (``None`` when the template dropped it)."""
        engine = self.engine
        self._check_adapter(adapter_name)
        feature, prompt = encode_input(item, self.template, engine.vocab_size, params.scoring)
        if feature is None:
            return None, None
        images = self.template.multimodal_prompt(feature, prompt)
        if images is not None and 'input_ids' in item:  # an encoded trajectory has its pixel tensors already
            feature = self.template.pixel_features(feature, images)
        resolved = resolve_params(params, len(prompt), engine.max_model_len, engine.vocab_size, engine.max_logprobs)
        return feature, EngineRequest(uuid.uuid4().hex, prompt, resolved, adapter_name, images, session_id)


def streamable(params: Any) -> Any:
    """``params`` unless it asks for scoring (``max_tokens=0``), which yields no tokens to stream.

    Raises:
        InvalidSamplingParamsError: ``max_tokens=0``.
    """
    if params.scoring:
        raise InvalidSamplingParamsError('max_tokens=0 scores the prompt and generates nothing to stream: '
                                         'use sample()')
    return params


def check_pause_mode(mode: object) -> None:
    """Raises InvalidRequestError unless ``mode`` is 'abort', 'keep' or 'wait'."""
    if mode not in PAUSE_MODES:
        raise InvalidRequestError(f'pause mode must be one of {PAUSE_MODES}, got {mode!r}')
