"""vLLM tensor parallel inside one Ray replica on CPU (the suite's only tp=2 engine): a group of one 2-CPU worker,
``tp_size=2``; the replica's engine runs two tensor-parallel worker processes and gives the greedy tokens of the
tp=1 engine."""

from __future__ import annotations

import asyncio

import psutil
import pytest
import pytest_asyncio

from twinkle_async import DeviceMesh

from conftest import TINY_ENGINE_ARGS, chat, ray_sampler, within

pytestmark = pytest.mark.slow

GREEDY = {'max_tokens': 12, 'temperature': 0, 'ignore_eos': True}
PROMPTS = [chat(p) for p in ('def main():', 'import os', 'class A:')] + [{'input_ids': [5, 6, 7]}]


@pytest_asyncio.fixture(scope='module', loop_scope='session')
async def tp2(ray_environment, tiny_model_dir):
    async with ray_sampler('tp', tiny_model_dir, cpus_per_worker=2, engine='vllm', engine_args=TINY_ENGINE_ARGS,
                           device_mesh=DeviceMesh.from_sizes(world_size=2, tp_size=2)) as sampler:
        yield sampler


def tensor_parallel_ranks(pid: int) -> list[str]:
    """The titles of the vLLM worker processes under process ``pid`` (``VLLM::Worker_TP<rank>`` once a worker knows
    its tensor-parallel rank, ``VLLM::Worker_<rank>`` before)."""
    titles = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            title = ' '.join(process.cmdline()) or process.name()
        except psutil.Error:
            continue
        titles += [word for word in title.split() if word.startswith('VLLM::Worker_')]
    return sorted(titles)


async def tensor_parallel_ranks_when_titled(pid: int, count: int) -> list[str]:
    """:func:`tensor_parallel_ranks` once ``count`` workers carry a title (polled: a worker renames itself after it
    starts; CI twice found fewer than two ``VLLM::Worker_TP`` titles within the wait, so either title counts)."""
    while len(ranks := tensor_parallel_ranks(pid)) < count:
        await asyncio.sleep(0.1)
    return ranks


async def test_tp2_in_one_ray_replica_gives_the_greedy_tokens_of_tp1(tp2, vllm_sampler):
    assert tp2.engine_args['tensor_parallel_size'] == 2
    (replica,) = await within(tp2.engine.replica_status())
    ranks = await within(tensor_parallel_ranks_when_titled(replica.pid, 2))
    assert len(ranks) == 2 and ranks[0] != ranks[1], ranks  # two worker processes: one per rank
    sharded = await within(tp2.sample(PROMPTS, GREEDY))
    whole = await within(vllm_sampler.sample(PROMPTS, GREEDY))
    assert [r.sequences[0].tokens for r in sharded] == [r.sequences[0].tokens for r in whole]
    assert all(len(r.sequences[0].tokens) == 12 for r in sharded)
