"""Engine contract: cancelled consumers abort their requests and free every slot (every engine)."""

from __future__ import annotations

import asyncio
import random

from twinkle_async import SamplingParams
from twinkle_async.engines.base import EngineRequest
from twinkle_async.sampler.requests import encode_input, resolve_params

from conftest import chat, start_long_stream, within


async def consume(sampler, how: str, after: int, max_tokens: int) -> int:
    """Read ``after`` deltas, then leave the stream by ``break`` (or ``aclose()``); returns deltas seen."""
    seen = 0
    stream = sampler.stream(chat(f'n = {after}'), {'max_tokens': max_tokens, 'ignore_eos': True, 'seed': after})
    async for _ in stream:
        seen += 1
        if seen >= after:
            break
    if how == 'aclose':
        await stream.aclose()
    return seen


async def test_200_streams_cancelled_at_random_points_free_every_slot(sampler):
    rng = random.Random(0)
    tasks = []
    for _ in range(200):
        how = rng.choice(['break', 'aclose', 'cancel'])
        tasks.append((how, asyncio.create_task(consume(sampler, how, rng.randint(1, 40), rng.randint(1, 48)))))
    for how, task in tasks:
        if how == 'cancel':
            await asyncio.sleep(0)
            task.cancel()
    await within(asyncio.gather(*(t for _, t in tasks), return_exceptions=True))
    stats = await within(sampler.engine.stats())
    assert (stats.waiting, stats.running, stats.used_slots) == (0, 0, 0)
    response = await within(sampler.sample(chat('after the storm'), {'max_tokens': 8, 'ignore_eos': True}))
    assert len(response.sequences[0].tokens) == 8


async def test_cancelling_a_sample_call_aborts_it(sampler):
    task = await start_long_stream(sampler, 'long', 400)
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
