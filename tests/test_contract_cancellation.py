"""Engine contract: cancelled consumers abort their requests and free every slot (every engine)."""

from __future__ import annotations

import asyncio
import random

from twinkle_async import SamplingParams
from twinkle_async.engines.base import EngineRequest
from twinkle_async.sampler.requests import encode_input, resolve_params

from conftest import chat, counters_when, start_stream, within

MAX_TOKENS = 256


async def leave_at(sampler, how: str, cut: int, seen: list[int]) -> None:
    """Stream until ``cut`` tokens have arrived, then leave mid-stream: ``break`` out of the loop (the stream is
    dropped unclosed), ``aclose()`` it, or cancel this task (it lands at the next await, inside the stream).
    Appends the tokens seen when it left to ``seen``."""
    tokens = 0
    stream = sampler.stream(chat(f'n = {cut}'), {'max_tokens': MAX_TOKENS, 'ignore_eos': True, 'seed': cut})
    try:
        async for delta in stream:
            tokens += len(delta.token_ids)
            if tokens >= cut and how == 'cancel':
                asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)
            elif tokens >= cut:
                break
        if how == 'aclose':
            await stream.aclose()
    finally:
        seen.append(tokens)


async def test_200_streams_left_at_points_spread_over_the_stream_are_aborted_and_free_every_slot(sampler):
    rng = random.Random(0)
    aborted_before = (await within(sampler.engine.stats())).aborted
    seen: dict[str, list[int]] = {'break': [], 'aclose': [], 'cancel': []}
    tasks = []
    for _ in range(200):
        how = rng.choice(list(seen))
        tasks.append((how, asyncio.create_task(leave_at(sampler, how, rng.randint(1, 64), seen[how]))))
    await within(asyncio.gather(*(t for _, t in tasks), return_exceptions=True))
    assert all(task.cancelled() == (how == 'cancel') for how, task in tasks)
    for how, points in seen.items():
        assert len(set(points)) >= 15 and min(points) <= 8 and max(points) >= 56, (how, sorted(points))
        assert max(points) < MAX_TOKENS, 'every stream was left before its end'
    stats = await within(counters_when(sampler, lambda s: s.aborted - aborted_before >= 200 and s.running == 0))
    assert (stats.aborted - aborted_before, stats.waiting, stats.used_slots) == (200, 0, 0)
    response = await within(sampler.sample(chat('after the storm'), {'max_tokens': 8, 'ignore_eos': True}))
    assert len(response.sequences[0].tokens) == 8


async def test_cancelling_a_sample_call_aborts_it(sampler):
    task, _ = await start_stream(sampler, chat('long'), {'max_tokens': 400, 'ignore_eos': True})
    task.cancel()
    await within(asyncio.gather(task, return_exceptions=True))
    stats = await within(sampler.engine.stats())
    assert stats.used_slots == 0 and stats.running == 0


async def test_abort_ends_the_stream_with_abort_and_partial_tokens(sampler):
    engine, results = sampler.engine, []
    _, prompt = encode_input(chat('abort me'), sampler.template, engine.vocab_size)
    params = resolve_params(SamplingParams(max_tokens=400, ignore_eos=True), len(prompt), engine.max_model_len,
                            engine.vocab_size)
    request = EngineRequest('abort-me', prompt, params)

    async def run() -> None:
        async for output in engine.generate(request):
            results.append(output)
            if len(results) == 2:
                await engine.abort(request.request_id)

    await within(run())
    assert results[-1].finish_reason == 'abort'
    assert sum(len(o.token_ids) for o in results) < 400
