"""vLLM-specific behaviour: engine-core death, engine_args validation, CPU defaults."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest

from conftest import chat, start_long_stream, within
from twinkle_async import AsyncSampler
from twinkle_async.errors import EngineArgsError, EngineDeadError


def engine_core_processes(exclude: set[int]) -> list[psutil.Process]:
    """vLLM engine-core processes started by this test (not those of the session's shared engines)."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in exclude and 'EngineCore' in p.name() + ' '.join(p.cmdline())]


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's one resource tracker per interpreter: shared, not the engine's to stop."""
    return 'multiprocessing.resource_tracker' in ' '.join(process.cmdline())


async def test_unknown_engine_arg_is_named(tiny_model_dir):
    with pytest.raises(EngineArgsError, match='max_num_seq_typo'):
        await within(AsyncSampler(str(tiny_model_dir), engine='vllm', engine_args={'max_num_seq_typo': 2}).start())


@pytest.mark.slow
async def test_killing_the_engine_core_fails_every_waiter_and_leaves_no_process(tiny_model_dir):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    sampler = AsyncSampler(str(tiny_model_dir), engine='vllm', engine_args={'max_model_len': 256, 'max_num_seqs': 8})
    await within(sampler.start(), 300)
    tasks = [await start_long_stream(sampler, f'p{i}', 240) for i in range(6)]
    cores = engine_core_processes(exclude=before)
    assert cores, 'vLLM runs its engine core in a child process'
    for process in cores:
        os.kill(process.pid, signal.SIGKILL)
    results = await within(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert all(isinstance(r, EngineDeadError) for r in results), results
    with pytest.raises(EngineDeadError):
        await within(sampler.sample(chat('after'), {'max_tokens': 2}), 10)
    await within(sampler.close(), 60)
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE and not _is_resource_tracker(p)]
    assert leftover == [], [p.cmdline() for p in leftover]


@pytest.mark.slow
async def test_tensor_parallel_2_on_cpu_matches_tp_1(tiny_model_dir, vllm_sampler):
    prompts = [chat(p) for p in ('def main():', 'import os', 'class A:')]
    params = {'max_tokens': 16, 'temperature': 0, 'ignore_eos': True}
    expected = await within(vllm_sampler.sample(prompts, params))
    engine_args = {'max_model_len': 256, 'max_num_seqs': 8, 'tensor_parallel_size': 2}
    async with AsyncSampler(str(tiny_model_dir), engine='vllm', engine_args=engine_args) as tp2:
        got = await within(tp2.sample(prompts, params))
    assert [r.sequences[0].tokens for r in got] == [r.sequences[0].tokens for r in expected]


async def test_burst_of_seeded_n4_requests_with_long_prompts_keeps_the_engine_alive(vllm_sampler):
    """vLLM-CPU dies on a seeded prompt prefilled in chunks; our defaults never split a prompt."""
    prompts = [{'input_ids': [(i * 7 + j) % 900 + 5 for j in range(420)]} for i in range(16)]
    params = {'max_tokens': 4, 'seed': 5, 'temperature': 1.0, 'ignore_eos': True}
    responses = await within(vllm_sampler.sample(prompts, params, num_samples=4), 300)
    assert all(len(r.sequences) == 4 and all(len(s.tokens) == 4 for s in r.sequences) for r in responses)
    assert not vllm_sampler.engine.is_dead
