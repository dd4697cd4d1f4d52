"""The engine thread: owns the model and the KV cache, runs schedule -> forward -> sample -> emit.

It never touches asyncio objects: it reads commands from a thread-safe inbox and hands each
step's outputs to the event loop through the ``emit`` callback (one call per step). Everything
that changes the model (adapters, weights, sleep) runs here too, between steps, via ``call``.
"""

from __future__ import annotations

import itertools
import queue
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from twinkle_async.engines.base import EngineOutput, EngineRequest, EngineStats, PauseMode
from twinkle_async.engines.torch.kv_cache import STAGING_SLOTS
from twinkle_async.engines.torch.model_runner import ModelRunner
from twinkle_async.engines.torch.parts import CacheLimits, runner_parts
from twinkle_async.engines.torch.postprocess import OutputProcessor
from twinkle_async.engines.torch.prompt_logprobs import prompt_logprob_rows
from twinkle_async.engines.torch.sampling import BatchFlags, sample_tokens
from twinkle_async.engines.torch.scheduler import Chunk, Scheduler
from twinkle_async.engines.torch.sequence import Request, Sample
from twinkle_async.engines.torch.slots import SlotTable

__all__ = ['EngineCore', 'CoreConfig']

Emit = Callable[[list[EngineOutput]], None]
Reply = Callable[[Any, Optional[BaseException]], object]


@dataclass(frozen=True, slots=True)
class CoreConfig:
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    seed: int
    eos_token_ids: frozenset[int]
    kv_cache_memory_bytes: int
    block_size: int
    processed_logprobs: bool = False


class EngineCore:
    """Continuous batching on one thread. ``run`` is the thread's target.

    Paused (``pause_mode`` set), new requests are held until ``resume``; 'keep' and 'abort' also stop
    stepping, 'wait' steps on until the requests in flight have finished.
    """

    def __init__(self, model: Any, tokenizer: Any, config: CoreConfig, emit: Emit,
                 fail: Callable[[BaseException], None]) -> None:
        device = next(model.parameters()).device
        text_config = model.config.get_text_config()
        self.tokenizer = tokenizer
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.table = SlotTable(config.max_num_seqs, text_config.vocab_size, device, config.seed)
        limits = CacheLimits(config.max_num_seqs + STAGING_SLOTS, config.max_model_len, config.kv_cache_memory_bytes,
                             config.block_size)
        self.parts = runner_parts(model, limits, device)
        self.cache, self.lora = self.parts.cache, self.parts.lora
        self.runner = ModelRunner(self.parts.forward, self.cache, self.table, model.dtype, device)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_num_seqs if self.parts.forward.chunked else None, self.table.move)
        self.processor = OutputProcessor(config.eos_token_ids, config.max_model_len)
        self.processed_logprobs = config.processed_logprobs
        self.weight_version = 0
        self.pause_mode: Optional[PauseMode] = None
        self.held: dict[str, Request] = {}
        self.aborted = 0
        self.steps = 0
        self._on_drained: list[Callable[[], object]] = []
        self._stale_kv = False
        self._emit, self._fail = emit, fail
        self._pending: list[EngineOutput] = []
        self._stopped = False

    # -- commands from the event loop (thread-safe) --
    def submit(self, request: EngineRequest, pixels: Optional[Mapping[str, Any]] = None) -> None:
        self.inbox.put(('add', (request, pixels)))

    def abort(self, request_id: str) -> None:
        self.inbox.put(('abort', request_id))

    def call(self, function: Callable[[], Any], reply: Reply) -> None:
        """Run ``function`` on this thread once every earlier command took effect; ``reply(result, error)``."""
        self.inbox.put(('call', (function, reply)))

    def stop(self) -> None:
        self.inbox.put(('stop', None))

    # -- the thread --
    def run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopped:
                    self._drain_inbox(block=self._idle and not self._pending)
                    if not self._idle:
                        self.step()
                    self._flush()
                    self._notify_drained()
        except BaseException as exc:  # the engine is dead: every waiter must learn it
            self._fail(exc)

    def step(self) -> None:
        """Decode every running sample and prefill what the scheduler admits (in one forward where the runner
        allows), start the samples whose prompts are cached and resume the preempted ones whose KV is, release
        finished slots."""
        if self._stale_kv:
            self._recompute()
        self.steps += 1
        chunks = self.scheduler.schedule()
        rows = len(self.scheduler.running)
        logits = self.runner.step(rows, chunks)
        if logits.decode is not None:
            self._pending += self._sample(logits.decode, self.scheduler.running[:rows], slice(0, rows))
        started: list[Request] = []
        last_logits: list[torch.Tensor] = []
        for chunk, chunk_logits in zip(chunks, logits.chunks):  # in slot order
            if not self._record_prompt(chunk, chunk_logits):
                continue
            if chunk.sample is not None:
                self._resume(chunk.sample)
            else:
                self.scheduler.start(chunk.request)
                started.append(chunk.request)
                last_logits.append(chunk_logits[-1])
        if started:
            self._pending += self._start(started, torch.stack(last_logits))
        self._release_finished()

    # -- run on this thread through ``call`` --
    def stats(self) -> EngineStats:
        s = self.scheduler
        queries, hits = self.cache.prefix_counts
        return EngineStats(waiting=len(s.waiting) + len(self.held), running=len(s.requests) - len(s.waiting),
                           used_slots=s.used_slots, kv_usage=self.cache.usage, prefix_cache_queries=queries,
                           prefix_cache_hits=hits, steps=self.steps, aborted=self.aborted,
                           preemptions=s.preemptions)

    def pause(self, mode: PauseMode, on_paused: Callable[[], object]) -> None:
        """Hold new requests; 'abort' ends those in flight, 'keep' freezes them, 'wait' lets them finish."""
        self.pause_mode = mode
        if mode == 'abort':
            for request_id in list(self.scheduler.requests):
                self._abort(request_id)
        if mode == 'wait' and not self.scheduler.idle:
            self._on_drained.append(on_paused)
        else:
            on_paused()

    def resume(self) -> None:
        self.pause_mode = None
        for request in self.held.values():
            self.scheduler.add(request)
        self.held.clear()

    def set_weights(self, apply: Callable[[], None], version: int) -> None:
        """Apply new weights between steps; running samples' KV is rebuilt before they go on."""
        apply()
        self.weight_version = version
        self.cache.new_weights(version)
        self._stale_kv = bool(self.scheduler.running)
        self.scheduler.restart_staged()

    def change_adapters(self, change: Callable[[], None]) -> None:
        """Load, replace or unload an adapter: KV cached under an adapter's name may no longer be its."""
        change()
        self.cache.reset_prefix_cache()

    # -- internals --
    @property
    def _idle(self) -> bool:
        return self.scheduler.idle or self.pause_mode in ('keep', 'abort')

    def _record_prompt(self, chunk: Chunk, logits: torch.Tensor) -> bool:
        """Keep the chunk's prompt logprob rows (when asked); whether it completed its prompt (or its preempted
        sample's context)."""
        request = chunk.request
        if request.params.prompt_logprobs is not None and chunk.sample is None:
            if chunk.start == 0:
                request.prompt_logprobs = [None]
            assert request.prompt_logprobs is not None
            request.prompt_logprobs += prompt_logprob_rows(
                logits, request.prompt_token_ids[chunk.start + 1:chunk.end + 1], request.params.prompt_logprobs)
        self.cache.commit(chunk.slot, chunk.tokens, chunk.end)
        return chunk.completes

    def _start(self, requests: list[Request], last_logits: torch.Tensor) -> list[EngineOutput]:
        """The requests' samples run (in consecutive slots) with their prompts cached: sample their first tokens."""
        samples = [s for r in requests for s in r.samples]
        first = samples[0].slot
        assert [s.slot for s in samples] == list(range(first, first + len(samples)))
        for sample in samples:
            sample.generator = self.table.seeded(sample.seed)
            self.table.assign(sample.slot, sample.params, sample.request.prompt_token_ids, sample.generator,
                              sample.request.adapter)
        counts = torch.tensor([len(r.samples) for r in requests], device=last_logits.device)
        return self._sample(torch.repeat_interleave(last_logits, counts, dim=0), samples,
                            slice(first, first + len(samples)))

    def _resume(self, sample: Sample) -> None:
        """A preempted sample's KV is cached again: it decodes its newest token next step."""
        self.scheduler.resume(sample)
        self.table.assign(sample.slot, sample.params, sample.context, sample.generator, sample.request.adapter,
                          next_token=sample.output_ids[-1])

    def _recompute(self) -> None:
        self._stale_kv = False
        by_adapter = sorted(self.scheduler.running, key=lambda s: s.request.adapter)
        for _, group in itertools.groupby(by_adapter, key=lambda s: s.request.adapter):
            self.runner.recompute(list(group))

    def _sample(self, logits: torch.Tensor, samples: list[Sample], rows: slice) -> list[EngineOutput]:
        flags = _flags(samples, self.processed_logprobs, logits.device)
        batch = sample_tokens(logits, self.table, rows, flags)
        self.table.advance(rows, batch.tokens, track_seen=flags.any_penalty)
        outputs = self.processor.process(samples, batch, self.weight_version)
        self._commit_generated(samples)
        return outputs

    def _commit_generated(self, samples: list[Sample]) -> None:
        """Blocks the samples just filled with generated tokens go to the prefix cache (a later turn's prompt
        holds them)."""
        every = self.cache.register_every
        if every:
            for sample in samples:
                cached = sample.num_cached
                if cached % every == 0:
                    self.cache.commit(sample.slot, sample.request.prompt_token_ids + sample.output_ids, cached)

    def _release_finished(self) -> None:
        for sample in [s for s in self.scheduler.running if s.finish_reason is not None]:
            self._release(sample)

    def _release(self, sample: Sample) -> None:
        self.scheduler.release(sample)
        if sample.request.finished:
            self.scheduler.finish(sample.request)

    def _drain_inbox(self, block: bool) -> None:
        """Handle the commands waiting now (waiting for one if ``block``); those arriving meanwhile are handled
        after the next step, so a stream of commands cannot hold stepping up."""
        try:
            command, payload = self.inbox.get(block=block)
        except queue.Empty:
            return
        self._handle(command, payload)
        for _ in range(self.inbox.qsize()):
            self._handle(*self.inbox.get_nowait())

    def _handle(self, command: str, payload: Any) -> None:
        if command == 'add':
            request = Request.from_engine_request(payload[0], self.tokenizer, payload[1])
            if self.pause_mode is None:
                self.scheduler.add(request)
            else:
                self.held[request.request_id] = request
        elif command == 'abort':
            self._abort(payload)
        elif command == 'call':
            function, reply = payload
            try:
                result = function()
            except Exception as exc:  # the caller gets it; the engine stays up
                reply(None, exc)
            else:
                reply(result, None)
        elif command == 'stop':
            self._stopped = True

    def _abort(self, request_id: str) -> None:
        request = self.held.pop(request_id, None) or self.scheduler.requests.get(request_id)
        if request is None or request.finished:
            return
        self.aborted += 1
        unstarted = request in self.scheduler.waiting or request is self.scheduler.staged
        running = not unstarted and request_id in self.scheduler.requests
        for sample in request.samples:
            if sample.finish_reason is None:
                sample.finish_reason = 'abort'
                self._pending.append(EngineOutput(request_id, sample.index, [], None, '', 'abort',
                                                  weight_version=self.weight_version))
                if running:
                    self._release(sample)
        if unstarted:
            self.scheduler.remove_waiting(request)

    def _notify_drained(self) -> None:
        if self._on_drained and self.scheduler.idle:
            callbacks, self._on_drained = self._on_drained, []
            for callback in callbacks:
                callback()

    def _flush(self) -> None:
        if self._pending:
            outputs, self._pending = self._pending, []
            self._emit(outputs)


def _flags(samples: list[Sample], processed_logprobs: bool, device: torch.device) -> BatchFlags:
    params = [s.params for s in samples]
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    asking = None
    if wanted and len(wanted) < len(params):
        asking = torch.tensor([i for i, p in enumerate(params) if p.logprobs is not None], device=device)
    return BatchFlags(
        any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        all_greedy=all(p.temperature == 0 for p in params),
        any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
        max_logprobs=max(wanted, default=-1), processed_logprobs=processed_logprobs, logprob_rows=asking,
        mask_rows=tuple(i for i, p in enumerate(params) if p.return_sampling_mask))

