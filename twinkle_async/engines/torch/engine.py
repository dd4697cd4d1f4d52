"""``TorchEngine``: the asyncio face of the engine thread (submit, per-request collectors, abort)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, Mapping, Optional, TypeVar

from twinkle_async.adapters import AdapterSpec, check_fits
from twinkle_async.engines.base import CacheKind, EngineOutput, EngineRequest, EngineStats, PauseMode
from twinkle_async.engines.collector import OutputCollector
from twinkle_async.engines.torch.args import TorchEngineArgs, parse_engine_args
from twinkle_async.engines.torch.core import CoreConfig, EngineCore
from twinkle_async.engines.torch.kv_cache import STAGING_SLOTS, SlotKVCache
from twinkle_async.engines.torch.loader import load_model, model_max_len
from twinkle_async.engines.torch.native.model import NativeCausalLM
from twinkle_async.errors import (
    EngineArgsError,
    EngineDeadError,
    InvalidRequestError,
    NotSupportedError,
    WeightUpdateError,
)
from twinkle_async.multimodal.processing import (
    ImageProcessor,
    MultiModalPrompt,
    check_image_limit,
    load_image_processor,
)
from twinkle_async.weights import NamedTensors, stage_update

T = TypeVar('T')

__all__ = ['TorchEngine', 'THREAD_NAME']

THREAD_NAME = 'twinkle-async-torch-engine'
"""The engine loop's thread: a leftover one after ``close()`` is a leak."""

logger = logging.getLogger(__name__)


class TorchEngine:
    """Native PyTorch continuous-batching engine; the model runs on a daemon thread.

    Build it with ``await TorchEngine.create(model_dir, engine_args)``.
    """

    def __init__(self, model: Any, tokenizer: Any, args: TorchEngineArgs, max_model_len: int,
                 images: Optional[ImageProcessor] = None) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.images = images
        self.vocab_size = model.config.get_text_config().vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = args.max_logprobs
        self.logprobs_mode = args.logprobs_mode
        self._loop = asyncio.get_running_loop()
        self._collectors: dict[str, OutputCollector[EngineOutput]] = {}
        self._dead: Optional[BaseException] = None
        config = CoreConfig(args.max_num_seqs, max_model_len, args.max_num_batched_tokens, args.seed,
                            _eos_token_ids(model, tokenizer), args.kv_cache_memory_bytes, args.block_size,
                            args.logprobs_mode == 'processed_logprobs')
        self.core = EngineCore(model, tokenizer, config, self._emit_threadsafe, self._fail_threadsafe)
        self.weights = self.core.parts.weights
        self._weight_version = 0
        self._staged: Optional[Callable[[], None]] = None  # applies the update stage_weights checked
        self._sleep_level = 0
        self._replies: set[asyncio.Future[Any]] = set()  # answers awaited from the thread
        self._thread = threading.Thread(target=self.core.run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @classmethod
    async def create(cls, model_dir: Path, engine_args: Optional[Mapping[str, Any]] = None) -> TorchEngine:
        """Load the model (off the event loop) and start the engine thread.

        Raises:
            EngineArgsError: unknown or invalid ``engine_args``.
        """
        args = parse_engine_args(engine_args)
        model, tokenizer = await asyncio.to_thread(load_model, model_dir, args)
        images = await asyncio.to_thread(load_image_processor, model_dir, args.trust_remote_code)
        max_model_len = _max_model_len(model, args)
        _check_kv_budget(model, args, max_model_len)
        return cls(model, tokenizer, args, max_model_len, images)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream ``request``'s outputs; cancelling or closing the iterator aborts it in the engine.

        Raises:
            EngineDeadError: the engine thread died (now or while this request ran).
            InvalidRequestError: ``num_samples`` exceeds the engine's slots, or the request needs more KV memory than
                the cache has.
            InvalidImageError: images for a text-only model, or more than ``limit_mm_per_prompt``.
        """
        self._check_alive()
        params = request.params
        if params.num_samples > self.args.max_num_seqs:
            raise InvalidRequestError(f'num_samples={params.num_samples} exceeds this engine\'s '
                                      f'max_num_seqs={self.args.max_num_seqs}')
        if not self.core.cache.fits(len(request.prompt_token_ids), params.num_samples, params.max_tokens):
            raise InvalidRequestError(
                f'a {len(request.prompt_token_ids)}-token prompt with num_samples={params.num_samples} and '
                f'max_tokens={params.max_tokens} needs more KV memory than kv_cache_memory_bytes='
                f'{self.args.kv_cache_memory_bytes} holds; lower one of them or raise the budget')
        pixels = await self._pixels(request.multi_modal) if request.multi_modal else None
        collector: OutputCollector[EngineOutput] = OutputCollector()
        self._collectors[request.request_id] = collector
        self.core.submit(request, pixels)
        unfinished = request.params.num_samples
        try:
            while unfinished:
                outputs = await collector.get()
                unfinished -= sum(1 for o in outputs if o.finish_reason is not None)
                for output in outputs:
                    yield output
        except BaseException:
            if unfinished and not self.is_dead:
                self.core.abort(request.request_id)
            raise
        finally:
            self._collectors.pop(request.request_id, None)

    async def _pixels(self, prompt: MultiModalPrompt) -> Mapping[str, Any]:
        """The image processor's tensors for the prompt's images (computed off the event loop)."""
        check_image_limit(prompt, 0 if self.images is None else (self.args.limit_mm_per_prompt or {}).get('image'))
        assert self.images is not None
        return await asyncio.to_thread(self.images.pixels, prompt.images, prompt.processor_kwargs)

    async def abort(self, request_id: str) -> None:
        """End ``request_id`` early; its unfinished samples finish with 'abort'."""
        if not self.is_dead:
            self.core.abort(request_id)

    async def stats(self) -> EngineStats:
        """The engine's counters once every earlier submission and abort has taken effect."""
        return await self._call(self.core.stats)

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def adapters(self) -> list[str]:
        return self.core.lora.names

    async def add_adapter(self, spec: AdapterSpec) -> None:
        """Load ``spec`` with PEFT (replacing an adapter of that name)."""
        check_fits(spec, self.weights.specs)
        await self._call(lambda: self.core.change_adapters(lambda: self.core.lora.add(spec)))

    async def remove_adapter(self, name: str) -> None:
        """Unload ``name``."""
        await self._call(lambda: self.core.change_adapters(lambda: self.core.lora.remove(name)))

    async def stage_weights(self, weights: NamedTensors, adapter_name: str) -> None:
        """Check and copy every tensor (off the loop), ready to be applied.

        Raises:
            WeightUpdateError: a bad name, shape or dtype, or ``weights`` raised; nothing was staged.
            AdapterNotFoundError: ``adapter_name`` is not loaded.
        """
        self._staged = None
        if adapter_name:
            staged = await stage_update(lambda: self.core.lora.stage(adapter_name, weights))
            self._staged = lambda: self.core.lora.load(adapter_name, staged)
        else:
            checked = await stage_update(lambda: self.weights.stage(weights))
            self._staged = lambda: self.weights.apply(checked)

    async def commit_weights(self, version: int) -> None:
        """Copy the staged tensors in between two steps, all at once; running samples' KV is recomputed.

        Raises:
            WeightUpdateError: nothing is staged.
        """
        apply, self._staged = self._staged, None
        if apply is None:
            raise WeightUpdateError('no weight update is staged: stage_weights() first')
        await self._call(lambda: self.core.set_weights(apply, version))
        self._weight_version = version

    async def discard_weights(self) -> None:
        self._staged = None

    async def pause(self, mode: PauseMode) -> None:
        """See :meth:`EngineCore.pause`; returns once the pause took effect ('wait': once drained)."""
        paused = self._reply()
        await self._call(lambda: self.core.pause(mode, lambda: self._loop.call_soon_threadsafe(_settle, paused)))
        await paused

    async def resume(self) -> None:
        if self._sleep_level == 0:
            await self._call(self.core.resume)

    async def sleep(self, level: int) -> None:
        """Abort what runs, free the KV cache (level 1) and the weights too (level 2) until ``wake_up``."""
        if level not in (1, 2):
            raise NotSupportedError(f'sleep level must be 1 or 2, got {level!r}')
        await self.pause('abort')
        await self._call(self.core.cache.release if level == 1 else self._release_all)
        self._sleep_level = max(self._sleep_level, level)

    async def wake_up(self) -> None:
        """Serve again; after ``sleep(2)`` every weight must have been sent with ``update_weights`` first.

        Raises:
            ConfigurationError: weights still dropped (named).
        """
        if self._sleep_level == 2:
            self.weights.check_complete()
        self._sleep_level = 0
        await self.resume()

    async def reset_cache(self, kind: CacheKind) -> None:
        """``'prefix'``: forget the prefix cache (the native runner's; the HF runner keeps none). This engine keeps
        no multimodal or encoder cache."""
        if kind == 'prefix':
            await self._call(self.core.cache.reset_prefix_cache)
        else:
            self._check_alive()

    async def close(self) -> None:
        """Stop the thread; requests still open fail with :class:`EngineDeadError`."""
        if self._thread.is_alive():
            self.core.stop()
            await asyncio.to_thread(self._thread.join, 30)
        self._fail(EngineDeadError('the engine was closed'))

    async def _call(self, function: Callable[[], T]) -> T:
        """``function()`` run on the engine thread between steps; its exception is raised here."""
        reply = self._reply()
        self.core.call(function, lambda result, error: self._loop.call_soon_threadsafe(_settle, reply, result, error))
        return await reply

    def _reply(self) -> asyncio.Future[Any]:
        """A future the thread settles; the engine's death fails it."""
        self._check_alive()
        reply: asyncio.Future[Any] = self._loop.create_future()
        self._replies.add(reply)
        reply.add_done_callback(self._replies.discard)
        return reply

    def _release_all(self) -> None:
        self.core.cache.release()
        self.weights.drop()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f'the torch engine is dead: {self._dead!r}') from self._dead

    def _emit_threadsafe(self, outputs: list[EngineOutput]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.core.stop()

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        for output in outputs:
            collector = self._collectors.get(output.request_id)
            if collector is not None:
                collector.put(output)

    def _fail_threadsafe(self, exc: BaseException) -> None:
        logger.error('torch engine thread died: %r', exc, exc_info=exc)
        try:
            self._loop.call_soon_threadsafe(self._fail, exc)
        except RuntimeError:
            pass

    def _fail(self, exc: BaseException) -> None:
        if self._dead is None:
            self._dead = exc
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f'the torch engine died: {exc!r}')
        for collector in self._collectors.values():
            collector.fail(error)
        for reply in list(self._replies):
            _settle(reply, None, error)


def _settle(future: asyncio.Future[Any], result: Any = None, error: Optional[BaseException] = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _max_model_len(model: Any, args: TorchEngineArgs) -> int:
    """The user's ``max_model_len``, or the longest that fits the model, 2048 and the KV budget (the native
    runner's paged pool must hold one sample of it, the HF runner's slot cache every slot)."""
    limit = model_max_len(model.config)
    if args.max_model_len is not None:
        if args.max_model_len > limit:
            raise EngineArgsError(f'max_model_len={args.max_model_len} exceeds the model\'s '
                                  f'max_position_embeddings={limit}')
        return args.max_model_len
    slots, spare = _budget_slots(model, args)
    fits_budget = args.kv_cache_memory_bytes // (SlotKVCache.bytes_per_token(model) * slots) - spare
    max_model_len = min(limit, 2048, max(fits_budget // 256 * 256, 256))
    logger.info('torch engine: max_model_len=%d (max_num_seqs=%d)', max_model_len, args.max_num_seqs)
    return max_model_len


def _check_kv_budget(model: Any, args: TorchEngineArgs, max_model_len: int) -> None:
    """The HF runner's slot cache must hold every slot at full length, the native runner's paged pool one sample."""
    slots, spare = _budget_slots(model, args)
    needed = SlotKVCache.bytes_per_token(model) * slots * (max_model_len + spare)
    if needed > args.kv_cache_memory_bytes:
        holds = f'max_num_seqs={args.max_num_seqs} x ' if slots > 1 else 'one sample of '
        raise EngineArgsError(
            f'the KV cache for {holds}max_model_len={max_model_len} needs {needed / 2**30:.2f} GiB, over '
            f'kv_cache_memory_bytes={args.kv_cache_memory_bytes / 2**30:.2f} GiB; lower one of them or raise the '
            'budget')


def _budget_slots(model: Any, args: TorchEngineArgs) -> tuple[int, int]:
    """Sequences of ``max_model_len`` the KV budget must hold at once, and spare positions each needs."""
    if isinstance(model, NativeCausalLM):
        return 1, args.block_size
    return args.max_num_seqs + STAGING_SLOTS, 0


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation_eos = getattr(getattr(model, 'generation_config', None), 'eos_token_id', None)
    for value in (generation_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


