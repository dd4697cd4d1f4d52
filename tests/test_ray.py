"""Samplers as Ray actors: dp replicas, routing, remote streams and cancellation, replica faults (local Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

from twinkle_async import DeviceGroup, DeviceMesh, SamplingParams, TorchSampler, initialize
from twinkle_async.errors import ConfigurationError, ReplicaDiedError

from conftest import chat, hf_greedy, load_hf, local_ray_cluster, within

pytestmark = pytest.mark.slow



@pytest.fixture(scope='module')
def ray_cluster(ray_environment):
    """A local Ray cluster with the seed's group: 2 CPU ranks named 'sampler'."""
    with local_ray_cluster('sampler'):
        yield


@pytest.fixture(scope='module')
def remote(ray_cluster, tiny_model_dir):
    """The seed's remote example with renamed imports: two replicas in the 'sampler' group. Routing, restarts and
    remote streams are the ReplicaEngine's whatever engine the replicas host: the torch engine here; vLLM replicas
    on Ray run in tests/twinkle_port (the seed's vLLMSampler, dp=2) and tests/distributed/test_vllm_tp.py."""
    sampler = TorchSampler(model_id=str(tiny_model_dir), device_mesh=DeviceMesh.from_sizes(dp_size=2),
                           remote_group='sampler', engine_args={'max_model_len': 512, 'max_num_seqs': 16})
    yield sampler
    sampler.close()


def status(sampler):
    return sampler._portal.call(sampler.async_sampler.engine.replica_status)


async def replicas_when(remote, condition):
    """The replicas' statuses once ``condition`` holds for them (polled)."""
    while not condition(statuses := await remote.async_sampler.engine.replica_status()):
        await asyncio.sleep(0.01)
    return statuses


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'condition not met in time'
        time.sleep(0.05)


def test_remote_sampling_has_the_local_structure_and_uses_both_replicas(remote, tiny_model_dir):
    served_before = sum(s.served for s in status(remote))
    prompts = [chat(f'def f{i}(x):') for i in range(6)]
    responses = remote.sample(prompts, sampling_params=SamplingParams(max_tokens=8, temperature=0), num_samples=2)
    assert [len(r.sequences) for r in responses] == [2] * 6
    model = load_hf(tiny_model_dir)
    for response in responses:
        assert response.sequences[0].tokens == hf_greedy(model, response.prompt_token_ids, 8)
    statuses = status(remote)
    assert len(statuses) == 2 and all(s.served > 0 for s in statuses)
    assert sum(s.served for s in statuses) == served_before + 6  # one request per item
    deltas = list(remote.stream(chat('x = '), {'max_tokens': 12, 'temperature': 0, 'ignore_eos': True}))
    assert sum(len(d.token_ids) for d in deltas) == 12 and deltas[-1].finish_reason == 'length'


def test_a_session_stays_on_one_replica(remote):
    before = {s.index: s.served for s in status(remote)}
    for turn in range(4):
        remote.sample({'input_ids': [5, 6, 7 + turn]}, {'max_tokens': 2}, session_id='conversation-1')
    grew = [s.index for s in status(remote) if s.served > before[s.index]]
    assert len(grew) == 1 and [s.served - before[s.index] for s in status(remote) if s.index in grew] == [4]


def test_cancelled_remote_streams_and_calls_leave_no_request_behind(remote):
    long = {'max_tokens': 400, 'ignore_eos': True}
    aborted_before = sum(s.aborted for s in status(remote))
    for i in range(8):
        stream = remote.stream({'input_ids': [5, 6, i + 7]}, long)
        for _ in range(i % 3 + 1):
            next(stream)
        stream.close()

    async def cancel_a_call() -> None:
        task = asyncio.create_task(remote.async_sampler.sample([{'input_ids': [9, 9]}] * 4, long))
        await within(replicas_when(remote, lambda statuses: sum(s.running for s in statuses) == 4))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    remote._portal.call(cancel_a_call)
    wait_until(lambda: all(s.running == 0 and s.used_slots == 0 for s in status(remote)), 60)
    assert sum(s.aborted for s in status(remote)) - aborted_before == 8 + 4, 'each one was aborted, not finished'


@pytest.mark.parametrize('retry', [True, False])
def test_a_killed_replica_fails_or_retries_and_comes_back_with_the_current_weights(remote, lora_dirs,
                                                                                   tiny_model_dir, retry):
    import ray
    from safetensors.torch import load_file

    sampler = remote.async_sampler
    if 'a' not in remote.list_adapters():
        remote.add_adapter_to_model('a', str(lora_dirs['a']))
    version = remote.update_weights(load_file(str(tiny_model_dir / 'model.safetensors')))
    sampler.engine.retry = retry

    async def batch_with_a_kill():
        batch = asyncio.create_task(sampler.sample([{'input_ids': [5, i]} for i in range(8)],
                                                   {'max_tokens': 300, 'ignore_eos': True}))
        await within(replicas_when(remote, lambda statuses: min(s.running for s in statuses) > 0))
        ray.kill(sampler.engine.replicas.actors[0])
        return await within(batch, 180)

    if retry:
        responses = remote._portal.call(batch_with_a_kill)
        assert all(len(r.sequences[0].tokens) == 300 for r in responses)
    else:
        with pytest.raises(ReplicaDiedError, match='replica 0 died'):
            remote._portal.call(batch_with_a_kill)
    wait_until(lambda: len(status(remote)) == 2, 180)
    assert {(s.weight_version, tuple(s.adapters)) for s in status(remote)} == {(version, ('a',))}
    served_before = {s.index: s.served for s in status(remote)}
    both = remote.sample([{'input_ids': [5, 6]}] * 2, {'max_tokens': 4, 'temperature': 0, 'ignore_eos': True},
                         adapter_name='a')  # a list is split over the replicas: the revived one serves half
    assert all(s.served == served_before[s.index] + 1 for s in status(remote))
    expected = hf_greedy(load_hf(tiny_model_dir, lora_dirs['a']), [5, 6], 4)
    assert [r.sequences[0].tokens for r in both] == [expected, expected]


def test_a_group_the_cluster_cannot_hold_fails_within_the_timeout(ray_cluster):
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"'gpus' needs 4 x GPU; the Ray cluster has 0 GPU"):
        initialize('ray', groups=[DeviceGroup(name='gpus', ranks=4, device_type='cuda')], timeout_s=3)
    assert time.monotonic() - started < 15
    with pytest.raises(ConfigurationError, match='not a group reserved'):
        TorchSampler(model_id='unused', remote_group='gpus', device_mesh=DeviceMesh.from_sizes(dp_size=1))
