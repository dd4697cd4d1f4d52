"""Admission, preemption, prefill chunks and slot bookkeeping: a FIFO of waiting requests, the preempted samples
(waiting to be computed again), at most one prompt being prefilled over several steps (in the staging slot), and
the running samples in slot order.

A request is admitted once the KV cache holds its prompt and each sample's first token (:meth:`KVCache.reserve`)
and, beyond what the running samples are expected to take still, what its samples are expected to take: each sample
is expected to generate the mean share of ``max_tokens`` the last finished samples generated (all of it until some
finished). Samples take memory as they generate (:meth:`KVCache.extend`). When they need memory the cache does not
have, the newest (latest request, highest sample index) is preempted: its KV is freed and, before any new
request is admitted, computed again from its tokens once memory is free (the prefix cache often still holds most of
it). It keeps its tokens, text and seeded generator, so its rollout goes on as if it never stopped (but for rounding:
its KV comes from one prefill instead of a decode step per token). vLLM's scheduler preempts the same way.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from twinkle_async.engines.torch.kv_cache import KVCache
from twinkle_async.engines.torch.sequence import Request, Sample

__all__ = ['Scheduler', 'Chunk', 'MIN_CHUNK']

MIN_CHUNK = 64
"""Prompt tokens a step prefills at least, however many rows decode (so prefill never starves)."""

LENGTH_WINDOW = 128
"""Finished samples whose lengths tell how much of ``max_tokens`` the next ones are expected to generate."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens ``start:end`` of ``request``'s prompt to prefill this step, their KV cached in ``slot`` (a chunk starts
    past 0 when earlier chunks or the prefix cache hold the positions before it); for a preempted ``sample``, of its
    :attr:`~Sample.context` (no logits wanted: it resumes with the token it last sampled)."""

    request: Request
    slot: int
    start: int
    end: int
    sample: Optional[Sample] = None

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_token_ids if self.sample is None else self.sample.context

    @property
    def completes(self) -> bool:
        whole = len(self.request.prompt_token_ids) if self.sample is None else self.sample.num_cached
        return self.end == whole


class Scheduler:
    """``running[i]`` is the sample in KV slot ``i``; slots stay dense (``0..len(running)-1``): when a sample
    leaves, the last one moves into its slot and ``move_row(src, dst)`` is told.

    Each step decodes every running sample and prefills prompt tokens within ``max_batched_tokens`` (decode rows
    count against it). A prompt whose uncached part fits what is left is prefilled whole, straight into its first
    sample's slot. With a ``staging_slot`` (the native runner), the next prompt that does not fit is prefilled there
    a chunk per step while the others keep decoding; without one, the step's first prompt is prefilled whole,
    whatever its length. A preempted sample is computed again whole (alone in a step when it does not fit the
    budget). ``preemptions`` counts the samples preempted since the start.
    """

    def __init__(self, kv: KVCache, num_slots: int, max_batched_tokens: int, staging_slot: Optional[int],
                 move_row: Callable[[int, int], object]) -> None:
        self.kv = kv
        self.num_slots = num_slots
        self.max_batched_tokens = max_batched_tokens
        self.staging_slot = staging_slot
        self.move_row = move_row
        self.waiting: deque[Request] = deque()
        self.running: list[Sample] = []
        self.preempted: list[Sample] = []  # by priority: the first resumes first
        self.requests: dict[str, Request] = {}
        self.staged: Optional[Request] = None  # the request being prefilled in the staging slot
        self.preemptions = 0
        self._arrivals = itertools.count()
        self._lengths: deque[float] = deque(maxlen=LENGTH_WINDOW)  # finished samples' tokens / max_tokens

    @property
    def expected_share(self) -> float:
        """The share of ``max_tokens`` a sample is expected to generate: the mean of the last finished samples'
        (1 before any finished)."""
        return sum(self._lengths) / len(self._lengths) if self._lengths else 1.0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self.staged is None and not self.preempted

    @property
    def used_slots(self) -> int:
        return len(self.running) + (self.staged is not None)

    def add(self, request: Request) -> None:
        request.arrival = next(self._arrivals)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> list[Chunk]:
        """This step's prefill work, once every running sample has memory for the token it decodes (preempting the
        newest while the cache is short), in order: the staged prompt's next chunk, preempted samples (oldest
        first), then — when no sample waits to resume — waiting prompts (FIFO) whole while they fit, and the next
        one's first chunk into the free staging slot.

        The samples of every prompt that completes this step, and the resumed samples, get their slots now (after
        the running ones, in chunk order); :meth:`start` and :meth:`resume` make them running once their chunk ran.
        """
        preempting = self._make_room()
        budget = max(self.max_batched_tokens - len(self.running), MIN_CHUNK)
        chunks: list[Chunk] = []
        free = _Free(next_slot=len(self.running), held=0, budget=budget, blocks=0)
        if self.staged is not None:
            chunks.append(self._next_chunk(self.staged, free.budget))
            free.budget -= chunks[-1].end - chunks[-1].start
            if chunks[-1].completes:
                free.next_slot = self._assign(self.staged, free.next_slot)
            else:
                free.held = len(self.staged.samples)
        if preempting or not (self.preempted or self.waiting):
            return chunks
        share = self.expected_share
        free.blocks = self._spare_blocks(share)
        self._resume_preempted(chunks, free, share)
        if not self.preempted:
            self._admit_waiting(chunks, free, share)
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
        assert request.samples[0].slot == len(self.running)
        self.running.extend(request.samples)

    def resume(self, sample: Sample) -> None:
        """A preempted sample's KV is cached again: it runs from now on."""
        assert sample.slot == len(self.running)
        self.running.append(sample)

    def release(self, sample: Sample) -> None:
        """Free ``sample``'s slot (the last running sample moves into it), or forget it if it is preempted."""
        if sample.finish_reason in ('stop', 'length'):
            self._lengths.append(min(len(sample.output_ids) / sample.params.max_tokens, 1.0))
        if sample.slot < 0:
            self.preempted.remove(sample)
            return
        slot, last = sample.slot, self.running.pop()
        sample.slot = -1
        self.kv.free(slot)
        if last is not sample:
            self.running[slot] = last
            last.slot = slot
            self.kv.move(len(self.running), slot, last.num_cached)
            self.move_row(len(self.running), slot)

    def finish(self, request: Request) -> None:
        """Forget a request whose samples all finished."""
        self.requests.pop(request.request_id, None)

    def remove_waiting(self, request: Request) -> None:
        """Drop a request that has not started (waiting, or staged: the staging slot is free again)."""
        if request is self.staged:
            self._unstage()
        else:
            self.waiting.remove(request)
        self.finish(request)

    def restart_staged(self) -> None:
        """Prefill the staged prompt again from its first token (its cached KV is stale: new weights)."""
        if self.staged is not None:
            self.staged.num_prefilled = 0

    def _make_room(self) -> bool:
        """Memory for the position every running sample writes this step, preempting the newest sample (or the
        staged prompt, when it is newer) while the cache is short; whether it was short."""
        short = [s for s in self.running if not self.kv.extend(s.slot, s.num_cached + 1)]
        for sample in sorted(short, key=_priority):
            while sample.slot >= 0 and not self.kv.extend(sample.slot, sample.num_cached + 1):
                self._preempt_newest()
        return bool(short)

    def _preempt_newest(self) -> None:
        newest = max(self.running, key=_priority)
        self.preemptions += 1
        if self.staged is not None and self.staged.arrival > newest.request.arrival:
            self.waiting.appendleft(self.staged)
            self._unstage()
            return
        self.release(newest)
        bisect.insort(self.preempted, newest, key=_priority)

    def _spare_blocks(self, share: float) -> int:
        """Free KV blocks beyond those the running samples (and the staged prompt's) are expected to take still."""
        blocks = self.kv.free_blocks
        for sample in self.running:
            blocks -= self.kv.blocks_to_grow(sample.slot, self._expected_len(sample, share))
        if self.staged is not None:
            length, samples = len(self.staged.prompt_token_ids), len(self.staged.samples)
            blocks -= (self.kv.blocks_needed(length, samples, _expected_new(self.staged, share), length)
                       - self.kv.blocks_needed(length, samples, 1, length))
        return blocks

    def _resume_preempted(self, chunks: list[Chunk], free: _Free, share: float) -> None:
        """Chunks computing preempted samples again, oldest first, while slots, memory and the budget allow (one
        that does not fit the budget goes whole when it comes first; a sample whose prompt a sibling's chunk
        computes waits for the next step, to find it cached)."""
        computing: set[Request] = set()  # requests whose prompt blocks a chunk of this step computes
        while self.preempted and free.budget > 0 and free.next_slot + free.held < self.num_slots:
            sample = self.preempted[0]
            context, adapter = sample.context, sample.request.adapter
            cached = self.kv.cached_tokens(context, adapter)
            if sample.request in computing or (len(context) - cached > free.budget and chunks):
                break
            expected = self.kv.blocks_needed(len(context), 1, self._expected_len(sample, share) - len(context),
                                             cached)
            if expected > free.blocks or self.kv.reserve(free.next_slot, context, 1, adapter) is None:
                break
            self.preempted.pop(0)
            sample.slot = free.next_slot
            chunks.append(Chunk(sample.request, sample.slot, cached, len(context), sample))
            if cached + self.kv.register_every <= len(sample.request.prompt_token_ids):
                computing.add(sample.request)
            free.next_slot += 1
            free.budget -= len(context) - cached
            free.blocks -= expected

    def _admit_waiting(self, chunks: list[Chunk], free: _Free, share: float) -> None:
        """Chunks for waiting prompts (FIFO): whole while they fit, then the next one's first into the staging slot."""
        while self.waiting and free.budget > 0:
            request = self.waiting[0]
            length, samples = len(request.prompt_token_ids), len(request.samples)
            if free.next_slot + free.held + samples > self.num_slots:
                break
            use_cached = request.params.prompt_logprobs is None  # prompt logprobs need every position's logits
            cached = self.kv.cached_tokens(request.prompt_token_ids, request.adapter) if use_cached else 0
            whole = length - cached <= free.budget or (self.staging_slot is None and not chunks)
            if not whole and (self.staging_slot is None or self.staged is not None):
                break
            expected = self.kv.blocks_needed(length, samples, _expected_new(request, share), cached)
            slot = free.next_slot if whole else self.staging_slot
            assert slot is not None
            if expected > free.blocks:
                break
            reserved = self.kv.reserve(slot, request.prompt_token_ids, samples, request.adapter, use_cached)
            if reserved is None:
                break
            self.waiting.popleft()
            request.num_prefilled = reserved
            if whole:
                chunks.append(Chunk(request, free.next_slot, reserved, length))
                free.next_slot = self._assign(request, free.next_slot)
            else:
                self.staged = request
                chunks.append(self._next_chunk(request, free.budget))
            free.budget -= chunks[-1].end - chunks[-1].start
            free.blocks -= expected

    @staticmethod
    def _expected_len(sample: Sample, share: float) -> int:
        """Positions ``sample`` is expected to hold when it finishes (at least one more than now)."""
        return len(sample.request.prompt_token_ids) + max(_expected_new(sample.request, share),
                                                          len(sample.output_ids) + 1)

    def _unstage(self) -> None:
        """The staged prompt leaves the staging slot (its blocks freed: admitted again, it starts over from what the
        prefix cache still holds)."""
        assert self.staging_slot is not None and self.staged is not None
        self.kv.free(self.staging_slot)
        self.staged = None

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


@dataclass(slots=True)
class _Free:
    """What a step can still give: slots from ``next_slot`` (``held`` of them kept for the staged prompt), prompt
    tokens (``budget``), and KV blocks beyond what the running samples are expected to take (``blocks``)."""

    next_slot: int
    held: int
    budget: int
    blocks: int


def _expected_new(request: Request, share: float) -> int:
    return max(1, math.ceil(share * request.params.max_tokens))


def _priority(sample: Sample) -> tuple[int, int]:
    return sample.priority
