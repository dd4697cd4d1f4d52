"""Weights streamed from a trainer in a separate OS process with ``WeightSender`` (gloo): into a local sampler and
into two Ray replicas of the default model, each replica a rank of its own; greedy outputs then equal a fresh
sampler on the trainer's weights, and a bad update is refused with the reason, nothing applied."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from twinkle_async import AsyncSampler, DeviceMesh

from conftest import chat, ray_sampler, within

pytestmark = pytest.mark.slow

TRAINER = Path(__file__).with_name('weight_trainer.py')
GREEDY = {'max_tokens': 12, 'temperature': 0, 'ignore_eos': True}
PROMPTS = [chat('Name a prime number.'), chat('What is the capital of France?')]
ENGINE_ARGS = {'dtype': 'float32', 'max_model_len': 256, 'max_num_seqs': 8}


async def run_trainer(address: str, model_dir: Path, out_dir: Path) -> dict:
    """The trainer script in a new process; what it printed."""
    process = await asyncio.create_subprocess_exec(sys.executable, str(TRAINER), address, str(model_dir),
                                                   str(out_dir), stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await within(process.communicate(), 300)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return json.loads(stdout.decode().strip().splitlines()[-1])


async def greedy(sampler) -> list[list[int]]:
    return [r.sequences[0].tokens for r in await within(sampler.sample(PROMPTS, GREEDY))]


async def fresh_greedy(model_dir: Path) -> list[list[int]]:
    async with AsyncSampler(str(model_dir), engine='torch', engine_args=ENGINE_ARGS) as fresh:
        return await greedy(fresh)


async def streamed_into(sampler, model_dir: Path, out_dir: Path) -> dict:
    """Stream the trainer's weights into ``sampler``; checks the outcome and returns the trainer's report."""
    before = await greedy(sampler)
    address = await sampler.open_weight_channel()
    report = await run_trainer(address, model_dir, out_dir)
    assert report['version'] == 7 and sampler.weight_version == 7
    assert "'model.layers.0.mlp.nope.weight' is not a weight" in report['refused']
    assert sampler.weight_version == 7, 'the refused update changed nothing'
    after = await greedy(sampler)
    assert after == await fresh_greedy(out_dir)
    assert after != before, "the trainer's weights change the answers"
    return report


async def test_a_trainer_process_streams_weights_into_a_local_sampler(tiny_model_dir, tmp_path):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=ENGINE_ARGS) as sampler:
        await streamed_into(sampler, tiny_model_dir, tmp_path / 'trained')


@pytest_asyncio.fixture(scope='module', loop_scope='session')
async def remote(ray_environment, default_model_dir):
    async with ray_sampler('sampler', default_model_dir, object_store_mib=1024, engine='torch',
                           engine_args=ENGINE_ARGS, device_mesh=DeviceMesh.from_sizes(dp_size=2)) as sampler:
        yield sampler


async def test_a_trainer_process_streams_the_default_model_into_two_ray_replicas(remote, default_model_dir, tmp_path):
    served = [s.served for s in await remote.engine.replica_status()]
    report = await streamed_into(remote, default_model_dir, tmp_path / 'trained')
    statuses = await remote.engine.replica_status()
    assert [s.weight_version for s in statuses] == [7, 7]
    assert all(s.served > n for s, n in zip(statuses, served)), 'both replicas answered after the update'
    print(f"\nstreamed {report['bytes'] / 1e9:.2f} GB into 2 replicas over gloo in {report['seconds']:.2f} s")
