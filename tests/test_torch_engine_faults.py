"""Torch engine faults: a forward that raises mid-batch kills the engine loudly, never a hang."""

from __future__ import annotations

import asyncio
import threading

import pytest

from conftest import chat, start_long_stream, within
from twinkle_async import AsyncSampler
from twinkle_async.errors import EngineDeadError


async def test_forward_raising_mid_batch_fails_every_waiter_and_refuses_new_work(tiny_model_dir):
    threads_before = {t.name for t in threading.enumerate()}
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args={'max_model_len': 256}) as sampler:
        model = sampler.engine.core.lora.model
        original = model.forward
        calls = {'n': 0}

        def exploding_forward(*args, **kwargs):
            calls['n'] += 1
            if calls['n'] == 6:
                raise RuntimeError('injected forward failure')
            return original(*args, **kwargs)

        model.forward = exploding_forward
        tasks = [asyncio.create_task(sampler.sample(chat(f'p{i}'), {'max_tokens': 200, 'ignore_eos': True}))
                 for i in range(8)]
        results = await within(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert 'injected forward failure' in str(results[0])
        with pytest.raises(EngineDeadError):
            await within(sampler.sample(chat('after'), {'max_tokens': 2}), 10)
        with pytest.raises(EngineDeadError):
            async for _ in sampler.stream(chat('after'), {'max_tokens': 2}):
                pass
    leftover = {t.name for t in threading.enumerate() if t.is_alive()} - threads_before
    assert 'twinkle-async-torch-engine' not in leftover


async def test_close_fails_open_requests_and_stops_the_thread(tiny_model_dir):
    sampler = AsyncSampler(str(tiny_model_dir), engine='torch', engine_args={'max_model_len': 256})
    await sampler.start()
    task = await start_long_stream(sampler, 'x', 250)
    engine = sampler.engine
    await within(sampler.close())
    with pytest.raises(EngineDeadError):
        await within(task, 10)
    assert not engine._thread.is_alive()
