"""Admission, prefill chunks and slot bookkeeping: a FIFO of waiting requests, at most one prompt being prefilled
over several steps (in the staging slot), and the running samples in slot order. A request is admitted only once
the KV cache holds memory for it to the end (:meth:`KVCache.reserve`), so a running sample is never preempted."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from twinkle_async.engines.torch.kv_cache import KVCache
from twinkle_async.engines.torch.sequence import Request, Sample

__all__ = ['Scheduler', 'Chunk', 'MIN_CHUNK']

MIN_CHUNK = 64
"""Prompt tokens a step prefills at least, however many rows decode (so prefill never starves)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prompt tokens ``start:end`` of ``request`` to prefill this step, their KV cached in ``slot`` (a chunk starts
    past 0 when earlier chunks or the prefix cache hold the positions before it)."""

    request: Request
    slot: int
    start: int
    end: int

    @property
    def completes(self) -> bool:
        return self.end == len(self.request.prompt_token_ids)


class Scheduler:
    """``running[i]`` is the sample in KV slot ``i``; slots stay dense (``0..len(running)-1``).

    Each step decodes every running sample and prefills prompt tokens within ``max_batched_tokens`` (decode rows
    count against it). A prompt whose uncached part fits what is left is prefilled whole, straight into its first
    sample's slot. With a ``staging_slot`` (the native runner), the next prompt that does not fit is prefilled there
    a chunk per step while the others keep decoding; without one, the step's first prompt is prefilled whole,
    whatever its length.
    """

    def __init__(self, kv: KVCache, num_slots: int, max_batched_tokens: int, staging_slot: Optional[int]) -> None:
        self.kv = kv
        self.num_slots = num_slots
        self.max_batched_tokens = max_batched_tokens
        self.staging_slot = staging_slot
        self.waiting: deque[Request] = deque()
        self.running: list[Sample] = []
        self.requests: dict[str, Request] = {}
        self.staged: Optional[Request] = None  # the request being prefilled in the staging slot

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self.staged is None

    @property
    def used_slots(self) -> int:
        return len(self.running) + (self.staged is not None)

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def admit(self) -> list[Chunk]:
        """This step's prefill work, in order: the staged prompt's next chunk, then waiting prompts (FIFO) whole
        while they fit, then the next one's first chunk into the free staging slot.

        The samples of every prompt that completes this step get their slots now (after the running ones, in
        chunk order); :meth:`start` makes them running once their first tokens are sampled.
        """
        budget = max(self.max_batched_tokens - len(self.running), MIN_CHUNK)
        chunks: list[Chunk] = []
        next_slot, held = len(self.running), 0  # held: slots the staged prompt will need after this step
        if self.staged is not None:
            chunks.append(self._next_chunk(self.staged, budget))
            budget -= chunks[-1].end - chunks[-1].start
            if chunks[-1].completes:
                next_slot = self._assign(self.staged, next_slot)
            else:
                held = len(self.staged.samples)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            length, samples = len(request.prompt_token_ids), len(request.samples)
            if next_slot + held + samples > self.num_slots:
                break
            use_cached = request.params.prompt_logprobs is None  # prompt logprobs need every position's logits
            uncached = length - (self.kv.cached_tokens(request.prompt_token_ids, request.adapter) if use_cached else 0)
            whole = uncached <= budget or (self.staging_slot is None and not chunks)
            if not whole and (self.staging_slot is None or self.staged is not None):
                break
            slot = next_slot if whole else self.staging_slot
            assert slot is not None
            cached = self.kv.reserve(slot, request.prompt_token_ids, samples, request.params.max_tokens,
                                     request.adapter, use_cached)
            if cached is None:
                break
            self.waiting.popleft()
            request.num_prefilled = cached
            if whole:
                chunks.append(Chunk(request, next_slot, cached, length))
                next_slot = self._assign(request, next_slot)
            else:
                self.staged = request
                chunks.append(self._next_chunk(request, budget))
            budget -= chunks[-1].end - chunks[-1].start
        return chunks

    def start(self, request: Request) -> None:
        """``request``'s prompt is cached (in its first sample's slot or the staging slot): every sample's slot
        gets it, and they run from now on."""
        source = self.staging_slot if request is self.staged else request.samples[0].slot
        assert source is not None
        for sample in request.samples:
            if sample.slot != source:
                self.kv.fork(source, sample.slot, len(request.prompt_token_ids))
        if request is self.staged:
            self.kv.free(source)
            self.staged = None
        self.running.extend(request.samples)

    def release(self, sample: Sample) -> Optional[tuple[int, int]]:
        """Free ``sample``'s slot; returns ``(src, dst)`` when the last slot moved into the hole."""
        slot, last = sample.slot, self.running.pop()
        sample.slot = -1
        self.kv.free(slot)
        if last is sample:
            return None
        self.running[slot] = last
        last.slot = slot
        self.kv.move(len(self.running), slot, last.num_cached)
        return len(self.running), slot

    def finish(self, request: Request) -> None:
        """Forget a request whose samples all finished."""
        self.requests.pop(request.request_id, None)

    def remove_waiting(self, request: Request) -> None:
        """Drop a request that has not started (waiting, or staged: the staging slot is free again)."""
        if request is self.staged:
            assert self.staging_slot is not None
            self.kv.free(self.staging_slot)
            self.staged = None
        else:
            self.waiting.remove(request)
        self.finish(request)

    def restart_staged(self) -> None:
        """Prefill the staged prompt again from its first token (its cached KV is stale: new weights)."""
        if self.staged is not None:
            self.staged.num_prefilled = 0

    def _next_chunk(self, request: Request, budget: int) -> Chunk:
        assert self.staging_slot is not None
        start = request.num_prefilled
        end = min(len(request.prompt_token_ids), start + budget)
        request.num_prefilled = end
        return Chunk(request, self.staging_slot, start, end)

    @staticmethod
    def _assign(request: Request, first: int) -> int:
        """Slots ``first, first + 1, ...`` for ``request``'s samples; returns the next free one."""
        for sample in request.samples:
            sample.slot = first
            first += 1
        return first
