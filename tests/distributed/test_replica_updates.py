"""Weight updates across Ray replicas as one transaction (dp=2, torch engine, tiny model): a replica that cannot
stage leaves both on the old weights and version; a replica killed during the commit comes back on the committed
version before it serves. Faults are injected by wrapping the driver's calls to the replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
from safetensors.torch import load_file

from twinkle_async import DeviceMesh
from twinkle_async.errors import WeightUpdateError

from conftest import hf_greedy, load_hf, ray_sampler, within

PROMPT = {'input_ids': [5, 6, 7]}
GREEDY = {'max_tokens': 6, 'temperature': 0, 'ignore_eos': True}


@pytest_asyncio.fixture(scope='module', loop_scope='session')
async def remote(ray_environment, tiny_model_dir):
    async with ray_sampler('sampler', tiny_model_dir, engine='torch',
                           engine_args={'max_model_len': 256, 'max_num_seqs': 8},
                           device_mesh=DeviceMesh.from_sizes(dp_size=2)) as sampler:
        yield sampler


async def on_both_replicas(remote) -> list[list[int]]:
    """Greedy tokens of the prompt from each replica (a list of two is split over them)."""
    served = [s.served for s in await remote.engine.replica_status()]
    responses = await within(remote.sample([PROMPT, PROMPT], GREEDY))
    assert [s.served for s in await remote.engine.replica_status()] == [n + 1 for n in served]
    return [r.sequences[0].tokens for r in responses]


async def both_alive(remote) -> list:
    while len(statuses := await remote.engine.replica_status()) < 2:
        await asyncio.sleep(0.05)
    return statuses


def inject(monkeypatch, remote, index: int, method: str, fault) -> None:
    """Run ``fault(actor)`` before the driver's call of ``method`` on replica ``index``."""
    replicas = remote.engine.replicas
    real = replicas.call

    async def call(i: int, name: str, *args):
        if (i, name) == (index, method):
            await fault(replicas.actors[i])
        return await real(i, name, *args)

    monkeypatch.setattr(replicas, 'call', call)


async def test_a_replica_that_cannot_stage_leaves_both_on_the_old_weights(remote, monkeypatch, tiny_model_dir,
                                                                          tiny_model_b_dir: Path):
    old = remote.weight_version
    expected = hf_greedy(load_hf(tiny_model_dir), PROMPT['input_ids'], 6)
    assert await on_both_replicas(remote) == [expected, expected]

    async def out_of_memory(actor) -> None:
        raise WeightUpdateError('injected: no memory to stage')

    inject(monkeypatch, remote, 1, 'stage_weights', out_of_memory)
    with pytest.raises(WeightUpdateError, match='replica 1 could not stage the update'):
        await within(remote.update_weights(load_file(str(tiny_model_b_dir / 'model.safetensors'))))
    monkeypatch.undo()
    assert remote.weight_version == old
    assert [s.weight_version for s in await remote.engine.replica_status()] == [old, old]
    assert await on_both_replicas(remote) == [expected, expected]
    with pytest.raises(WeightUpdateError, match='no weight update is staged'):  # replica 0's staged copy was dropped
        await within(remote.engine.replicas.call(0, 'commit_weights', old + 1))


async def test_a_replica_killed_during_the_commit_comes_back_on_the_committed_version(remote, monkeypatch,
                                                                                       tiny_model_b_dir: Path):
    import ray

    async def kill(actor) -> None:
        ray.kill(actor, no_restart=True)

    inject(monkeypatch, remote, 1, 'commit_weights', kill)
    version = await within(remote.update_weights(load_file(str(tiny_model_b_dir / 'model.safetensors'))))
    monkeypatch.undo()
    statuses = await within(both_alive(remote), 300)
    assert [s.weight_version for s in statuses] == [version, version]
    expected = hf_greedy(load_hf(tiny_model_b_dir), PROMPT['input_ids'], 6)
    assert await on_both_replicas(remote) == [expected, expected]
