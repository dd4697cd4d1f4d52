"""Load, cancellation-storm and leak drivers shared by ``tests/reliability`` and the benchmarks.

Every driver takes a started ``AsyncSampler`` (either engine), uses only its public API plus
``engine.stats()`` and ``admission.pending``, and returns a report of plain figures: the tests assert on
them at reduced sizes, ``bench_load.py`` and ``soak.py`` print them at full size.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from common import tree_rss_mib

__all__ = ['LoadReport', 'StormReport', 'Leaks', 'run_load', 'run_cancel_storm', 'leaks', 'percentile', 'random_prompt',
           'thread_names', 'STORM_MODES']


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float('nan')
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def random_prompt(rng: random.Random, vocab_size: int, length: tuple[int, int]) -> dict[str, list[int]]:
    """Token ids drawn from the vocabulary, skipping the first 8 (special tokens in our models)."""
    return {'input_ids': [rng.randrange(8, vocab_size) for _ in range(rng.randint(*length))]}


@dataclass
class Leaks:
    """What a sampler still holds once every request has ended: all zero when nothing leaked."""

    waiting: int
    running: int
    used_slots: int
    kv_usage: float
    pending: int

    @property
    def clean(self) -> bool:
        return (self.waiting, self.running, self.used_slots, self.kv_usage, self.pending) == (0, 0, 0, 0.0, 0)


async def leaks(sampler: Any) -> Leaks:
    """The engine's counters and the sampler's requests in flight, after a 1-token probe request.

    The probe makes vLLM run one more step, so its scheduler reports KV usage after every abort landed.
    """
    await sampler.sample({'input_ids': [8, 9, 10]}, {'max_tokens': 1})
    stats = await sampler.engine.stats()
    return Leaks(stats.waiting, stats.running, stats.used_slots, stats.kv_usage, sampler.admission.pending)


@dataclass
class LoadReport:
    """One load run: every request's latency, tokens generated vs asked for, memory around the run."""

    requests: int
    concurrency: int
    streams: int
    tokens: int
    seconds: float
    p50_s: float
    p99_s: float
    max_s: float
    wrong_token_counts: int
    rss_before_mib: float
    rss_after_mib: float
    leaks: Leaks

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), 'tokens_per_s': self.tokens_per_s, 'requests_per_s': self.requests_per_s,
                'leaks_clean': self.leaks.clean}


async def run_load(sampler: Any, *, requests: int = 2000, concurrency: int = 256, seed: int = 0,
                   max_tokens: tuple[int, int] = (1, 24), prompt_len: tuple[int, int] = (4, 96),
                   stream_every: int = 4) -> LoadReport:
    """``requests`` seeded random requests, at most ``concurrency`` in flight; every ``stream_every``-th streams.

    Each asks for an exact number of tokens (``ignore_eos``), so a wrong count is a lost or extra token.
    """
    rng = random.Random(seed)
    vocab = sampler.engine.vocab_size
    work = [(random_prompt(rng, vocab, prompt_len), rng.randint(*max_tokens)) for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    counts: list[int] = []

    async def one(index: int) -> None:
        prompt, wanted = work[index]
        params = {'max_tokens': wanted, 'ignore_eos': True, 'temperature': 1.0, 'seed': index}
        async with gate:
            start = time.perf_counter()
            if stream_every and index % stream_every == 0:
                got = sum([len(delta.token_ids) async for delta in sampler.stream(prompt, params)])
            else:
                got = len((await sampler.sample(prompt, params)).sequences[0].tokens)
            latencies.append(time.perf_counter() - start)
        counts.append(got - wanted)

    rss_before = tree_rss_mib()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - start
    return LoadReport(
        requests=requests, concurrency=concurrency, streams=len(range(0, requests, stream_every or requests + 1)),
        tokens=sum(m for _, m in work), seconds=seconds, p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99), max_s=max(latencies), wrong_token_counts=sum(c != 0 for c in counts),
        rss_before_mib=rss_before, rss_after_mib=tree_rss_mib(), leaks=await leaks(sampler))


STORM_MODES = ('cancel-before-first', 'cancel-mid', 'break', 'aclose', 'after-last')
"""How a storm's streams end: task cancelled before its first token or at a random point, ``break`` or
``aclose()`` after a random number of deltas, or left (broken off and closed) once the last delta came."""


@dataclass
class StormReport:
    """One cancellation storm, in waves: how each stream ended and memory after each wave."""

    streams: int
    by_mode: dict[str, int]
    before_first_token: int
    reached_last_token: int
    seconds: float
    rss_after_wave_mib: list[float] = field(default_factory=list)
    leaks: Leaks | None = None
    aborted: int = 0  # requests the engine ended by an abort during the storm (its own counter)

    @property
    def ended_mid_stream(self) -> int:
        """Streams that had a token but not their last: each one's request must have been aborted."""
        return self.streams - self.before_first_token - self.reached_last_token

    @property
    def rss_growth_mib(self) -> float:
        """RSS after the last wave minus after the first (the first wave warms the allocators)."""
        return self.rss_after_wave_mib[-1] - self.rss_after_wave_mib[0]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), 'rss_growth_mib': self.rss_growth_mib,
                'leaks_clean': self.leaks is not None and self.leaks.clean}


async def _storm_stream(sampler: Any, rng: random.Random, mode: str, index: int) -> tuple[int, bool]:
    """One stream ended the ``mode`` way; returns (deltas seen, whether the final delta arrived)."""
    max_tokens = rng.randint(1, 40)
    stop_after = rng.randint(1, max_tokens)
    prompt = random_prompt(rng, sampler.engine.vocab_size, (4, 48))
    stream = sampler.stream(prompt, {'max_tokens': max_tokens, 'ignore_eos': True, 'seed': index})
    seen, last = 0, False
    async for delta in stream:
        seen += 1
        last = delta.finish_reason is not None
        if last or (mode in ('break', 'aclose') and seen >= stop_after):
            break
    if mode in ('aclose', 'after-last'):
        await stream.aclose()
    return seen, last


async def run_cancel_storm(sampler: Any, *, streams: int = 1000, waves: int = 4, seed: int = 0) -> StormReport:
    """``streams`` streams in ``waves`` concurrent waves, each ended one of the :data:`STORM_MODES` ways."""
    rng = random.Random(seed)
    by_mode = {mode: 0 for mode in STORM_MODES}
    report = StormReport(streams=streams, by_mode=by_mode, before_first_token=0, reached_last_token=0, seconds=0)
    start = time.perf_counter()
    aborted_before = (await sampler.engine.stats()).aborted
    per_wave = -(-streams // waves)
    for first in range(0, streams, per_wave):
        tasks: list[tuple[str, asyncio.Task[tuple[int, bool]]]] = []
        for index in range(first, min(first + per_wave, streams)):
            mode = rng.choice(STORM_MODES)
            by_mode[mode] += 1
            tasks.append((mode, asyncio.create_task(_storm_stream(sampler, random.Random(index), mode, index))))
        await _cancel(tasks, rng)
        for outcome in await asyncio.gather(*(task for _, task in tasks), return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                raise outcome
            seen, last = (0, False) if isinstance(outcome, BaseException) else outcome
            report.before_first_token += seen == 0
            report.reached_last_token += last
        report.rss_after_wave_mib.append(tree_rss_mib())
    report.seconds = time.perf_counter() - start
    report.leaks = await leaks(sampler)
    report.aborted = (await sampler.engine.stats()).aborted - aborted_before
    return report


async def _cancel(tasks: list[tuple[str, asyncio.Task[Any]]], rng: random.Random) -> None:
    """Cancel the 'cancel-before-first' tasks once their requests are in and the 'cancel-mid' ones at random moments."""
    await asyncio.sleep(0)  # every stream has submitted its request; few have a token yet
    for mode, task in tasks:
        if mode == 'cancel-before-first':
            task.cancel()
    middle = [task for mode, task in tasks if mode == 'cancel-mid']
    rng.shuffle(middle)
    for task in middle:
        await asyncio.sleep(rng.uniform(0, 0.02))
        task.cancel()


def thread_names() -> set[str]:
    """Names of the live threads (engine threads are named; a leftover one shows up here)."""
    return {thread.name for thread in threading.enumerate() if thread.is_alive()}
