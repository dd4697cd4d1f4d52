"""Load, cancellation storms and a short soak on the tiny model, each engine: nothing lost, nothing leaked.

2,000 requests (a quarter streamed) with 256 in flight, then 1,000 streams ended at random points in
four waves (full size, as the issue asks), then 20 s of ``benchmarks/soak.py``'s mixed workload with
weight updates. Figures are printed (``pytest -s``); ``benchmarks/bench_load.py`` and ``soak.py`` print
the same at any size. RSS bounds are on the whole process tree (vLLM's engine core included).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
from soak import OPERATIONS, Soak

from conftest import ENGINES, chat, start_stream, within
from loadgen import leaks, run_cancel_storm, run_load

pytestmark = pytest.mark.slow

LOAD_ENGINE_ARGS = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': 256, 'seed': 0}
RSS_BOUND_MIB = 96
"""Tree RSS may grow this much over 2,000 requests after a warm-up of 2,000 (allocator pools, caches): vLLM's tree
(~3.6 GiB) was seen to grow 65 MiB in CI; a leak of 48 KiB per request (one prompt's KV, a kept output) fails it."""


@pytest_asyncio.fixture(scope='module', params=ENGINES)
async def load_sampler(request: pytest.FixtureRequest, tiny_model_dir: Path):
    """A sampler with 256 slots (torch) / 256 sequences (vLLM), warmed with 2,000 requests at 256 in flight."""
    from twinkle_async import AsyncSampler
    engine_args = {**LOAD_ENGINE_ARGS, **({'kv_cache_memory_bytes': 64 * 2**20} if request.param == 'vllm' else {})}
    async with AsyncSampler(str(tiny_model_dir), engine=request.param, engine_args=engine_args) as sampler:
        await within(run_load(sampler, requests=2000, concurrency=256, seed=99), 300)
        yield sampler


async def test_2000_requests_256_in_flight_all_finish_with_their_token_counts(load_sampler):
    report = await within(run_load(load_sampler, requests=2000, concurrency=256), 600)
    print(f'\n{load_sampler.engine_kind}: {report.as_dict()}')
    assert report.wrong_token_counts == 0
    assert report.leaks.clean, report.leaks
    assert report.rss_after_mib - report.rss_before_mib < RSS_BOUND_MIB, report


async def test_1000_streams_cancelled_at_random_points_leave_nothing_behind(load_sampler):
    report = await within(run_cancel_storm(load_sampler, streams=1000, waves=4), 600)
    print(f'\n{load_sampler.engine_kind}: {report}')
    assert report.before_first_token > 50 and report.reached_last_token > 50, report
    assert report.ended_mid_stream <= report.aborted <= report.streams - report.reached_last_token, report
    assert report.leaks.clean, report.leaks
    assert abs(report.rss_growth_mib) < RSS_BOUND_MIB, report


async def test_kv_usage_is_reported_while_streams_run_and_returns_to_zero(load_sampler):
    """The storm's zero KV usage means something: the same counter is above zero mid-flight."""
    tasks = [(await start_stream(load_sampler, chat(f'kv {i}'), {'max_tokens': 300, 'ignore_eos': True}))[0]
             for i in range(4)]
    busy = await within(load_sampler.engine.stats())
    for task in tasks:
        task.cancel()
    await within(asyncio.gather(*tasks, return_exceptions=True))
    assert busy.kv_usage > 0 and busy.used_slots == 4, busy
    assert (await within(leaks(load_sampler))).clean


async def test_a_soak_of_mixed_work_and_weight_updates_ends_clean(load_sampler, tiny_model_dir):
    report = await within(Soak(load_sampler, tiny_model_dir, seconds=20, concurrency=16, update_every=4).run(), 120)
    print('\n'.join([f'\n{load_sampler.engine_kind}:', *report.lines()]))
    assert report.ok
    assert set(report.operations) == set(OPERATIONS) and report.updates >= 4 and report.updates % 2 == 0
    assert sum(report.expected_errors.values()) == report.operations['bad-request']
