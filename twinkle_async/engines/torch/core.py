"""The engine thread: owns the model and the KV cache, runs schedule -> forward -> sample -> emit.

It never touches asyncio objects: it reads commands from a thread-safe inbox and hands each
step's outputs to the event loop through the ``emit`` callback (one call per step).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Callable

import torch

from twinkle_async.engines.base import EngineOutput, EngineRequest, EngineStats
from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.engines.torch.model_runner import ModelRunner
from twinkle_async.engines.torch.postprocess import OutputProcessor
from twinkle_async.engines.torch.sampling import BatchFlags, sample_tokens
from twinkle_async.engines.torch.scheduler import Scheduler
from twinkle_async.engines.torch.sequence import Request, Sample
from twinkle_async.engines.torch.slots import SlotTable
from twinkle_async.engines.torch.prompt_logprobs import prompt_logprob_rows

__all__ = ['EngineCore', 'CoreConfig']

Emit = Callable[[list[EngineOutput]], None]


@dataclass(frozen=True, slots=True)
class CoreConfig:
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    seed: int
    eos_token_ids: frozenset[int]


class EngineCore:
    """Continuous batching on one thread. ``run`` is the thread's target."""

    def __init__(self, model: Any, tokenizer: Any, config: CoreConfig, emit: Emit,
                 fail: Callable[[BaseException], None]) -> None:
        device = next(model.parameters()).device
        text_config = model.config.get_text_config()
        self.tokenizer = tokenizer
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens)
        self.table = SlotTable(config.max_num_seqs, text_config.vocab_size, device, config.seed)
        self.cache = SlotKVCache(text_config.num_hidden_layers, config.max_num_seqs,
                                 text_config.num_key_value_heads, _head_dim(text_config),
                                 config.max_model_len, model.dtype, device)
        self.runner = ModelRunner(model, self.cache, self.table, device)
        self.processor = OutputProcessor(config.eos_token_ids, config.max_model_len)
        self._emit, self._fail = emit, fail
        self._pending: list[EngineOutput] = []
        self._stopped = False

    # -- commands from the event loop (thread-safe) --
    def submit(self, request: EngineRequest) -> None:
        self.inbox.put(('add', request))

    def abort(self, request_id: str) -> None:
        self.inbox.put(('abort', request_id))

    def sync(self, reply: Callable[[EngineStats], None]) -> None:
        """``reply(stats)`` runs on this thread once every earlier command took effect."""
        self.inbox.put(('sync', reply))

    def stop(self) -> None:
        self.inbox.put(('stop', None))

    # -- the thread --
    def run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopped:
                    self._drain_inbox(block=self.scheduler.idle and not self._pending)
                    if not self.scheduler.idle:
                        self.step()
                    self._flush()
        except BaseException as exc:  # the engine is dead: every waiter must learn it
            self._fail(exc)

    def step(self) -> None:
        """Decode every running sample, admit and prefill waiting requests, release finished slots."""
        if self.scheduler.running:
            self._pending += self._decode()
            self._release_finished()
        admitted = self.scheduler.admit()
        if admitted:
            self._pending += self._prefill(admitted)
            self._release_finished()

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(waiting=len(s.waiting), running=len(s.requests) - len(s.waiting),
                           used_slots=len(s.running))

    def _decode(self) -> list[EngineOutput]:
        samples = list(self.scheduler.running)
        logits = self.runner.decode(len(samples))
        return self._sample(logits, samples, slice(0, len(samples)))

    def _prefill(self, requests: list[Request]) -> list[EngineOutput]:
        samples = [s for r in requests for s in r.samples]
        for sample in samples:
            self.table.assign(sample.slot, sample.params, sample.request.prompt_token_ids, sample.seed)
        result = self.runner.prefill(requests)
        for request in requests:
            if request.request_id in result.prompt_logits:
                request.prompt_logprobs = prompt_logprob_rows(
                    result.prompt_logits[request.request_id], request.prompt_token_ids,
                    request.params.prompt_logprobs or 0)
        counts = torch.tensor([len(r.samples) for r in requests], device=result.last_logits.device)
        logits = torch.repeat_interleave(result.last_logits, counts, dim=0)
        first = samples[0].slot
        return self._sample(logits, samples, slice(first, first + len(samples)))

    def _sample(self, logits: torch.Tensor, samples: list[Sample], rows: slice) -> list[EngineOutput]:
        flags = _flags(samples)
        batch = sample_tokens(logits, self.table, rows, flags)
        self.table.advance(rows, batch.tokens, track_seen=flags.any_penalty)
        return self.processor.process(samples, batch)

    def _release_finished(self) -> None:
        for sample in [s for s in self.scheduler.running if s.finish_reason is not None]:
            self._release(sample)

    def _release(self, sample: Sample) -> None:
        moved = self.scheduler.release(sample)
        if moved is not None:
            src, dst = moved
            self.cache.copy_slot(src, dst, self.scheduler.running[dst].num_cached)
            self.table.move(src, dst)
        if sample.request.finished:
            self.scheduler.finish(sample.request)

    def _drain_inbox(self, block: bool) -> None:
        try:
            command, payload = self.inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handle(command, payload)
            try:
                command, payload = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: str, payload: Any) -> None:
        if command == 'add':
            self.scheduler.add(Request.from_engine_request(payload, self.tokenizer))
        elif command == 'abort':
            self._abort(payload)
        elif command == 'sync':
            payload(self.stats())
        elif command == 'stop':
            self._stopped = True

    def _abort(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return
        waiting = request in self.scheduler.waiting
        for sample in request.samples:
            if sample.finish_reason is None:
                sample.finish_reason = 'abort'
                self._pending.append(EngineOutput(request_id, sample.index, [], None, '', 'abort'))
                if not waiting:
                    self._release(sample)
        if waiting:
            self.scheduler.remove_waiting(request)

    def _flush(self) -> None:
        if self._pending:
            outputs, self._pending = self._pending, []
            self._emit(outputs)


def _flags(samples: list[Sample]) -> BatchFlags:
    params = [s.params for s in samples]
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    return BatchFlags(
        any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        all_greedy=all(p.temperature == 0 for p in params),
        any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
        max_logprobs=max(wanted, default=-1))


def _head_dim(config: Any) -> int:
    return getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
