"""RL rollouts on both engines: the staleness bound (``max_staleness``) under a trainer updating weights every few
tokens, and ``sample_groups`` (accept / target / abort the rest)."""

from __future__ import annotations

import asyncio

import pytest
from safetensors.torch import load_file

from conftest import counters_when, within

UPDATES = 10
CLOCK_TOKENS = 12  # the trainer updates after every this many tokens of its clock stream


@pytest.fixture
async def bounded(sampler):
    """The shared sampler with ``max_staleness=1`` for the test."""
    sampler.rollouts.max_staleness = 1
    yield sampler
    sampler.rollouts.max_staleness = None


async def trainer(sampler, weights, until: int) -> int:
    """Update the weights (the same tensors: a new version) after every ``CLOCK_TOKENS`` tokens of a stream it
    reads as its clock (started again when the bound drops it), up to version ``until``."""
    version = sampler.weight_version
    while version < until:
        seen = 0
        async for delta in sampler.stream({'input_ids': [7, 8, 9]}, {'max_tokens': 400, 'ignore_eos': True}):
            seen += len(delta.token_ids)
            if seen >= CLOCK_TOKENS:
                version, seen = await sampler.update_weights(weights), 0
                if version >= until:
                    break
    return version


async def test_max_staleness_1_no_returned_token_is_over_1_version_old_across_many_updates(bounded, tiny_model_dir):
    sampler = bounded
    until = sampler.weight_version + UPDATES
    before = sampler.metrics()
    weights = load_file(str(tiny_model_dir / 'model.safetensors'))

    async def rollout(i: int):
        response = await sampler.sample({'input_ids': [5, 6, i]}, {'max_tokens': 24, 'ignore_eos': True, 'seed': i},
                                        num_samples=2)
        return response, sampler.weight_version  # the version current when it was returned

    async def rollouts_until_the_trainer_is_done(updating: asyncio.Task):
        results = []
        while not updating.done():
            results += await asyncio.gather(*(rollout(i) for i in range(8)))
        return results + await asyncio.gather(*(rollout(i) for i in range(8)))

    updating = asyncio.create_task(trainer(sampler, weights, until))
    results = await within(rollouts_until_the_trainer_is_done(updating), 300)
    last = await within(updating)
    stale = [current - v for response, current in results for s in response.sequences for v in s.weight_versions]
    assert last >= until and len(stale) == len(results) * 2 * 24
    assert max(stale) <= 1, 'a token more than one version old was returned'
    after = sampler.metrics()
    assert after['max_staleness_returned'] <= 1
    assert after['restarted'] > before['restarted'], 'the bound had to restart rollouts (the test exercised it)'
    assert len({v for response, _ in results for s in response.sequences for v in s.weight_versions}) >= 3
    await within(counters_when(sampler, lambda s: s.running == 0 and s.used_slots == 0))


async def test_sample_groups_returns_the_target_aborts_the_rest_and_saves_tokens(sampler):
    """Width ceil(2 x 2) = 4 groups of 4. ``accept`` takes half the prompts. Long prompts leave little room (few
    tokens: they finish first), short ones hundreds of tokens: the first long group is accepted (40 tokens), the
    second rejected (45) and its place goes to the next prompt, a long one that is accepted (50 more); the two
    short groups still running then are aborted, the last three prompts never start."""
    room = sampler.engine.max_model_len

    def prompt(length: int) -> dict:
        return {'input_ids': [5 + i % 400 for i in range(length)]}

    prompts = [prompt(room - 40), prompt(10), prompt(room - 45), prompt(12),
               prompt(room - 50), prompt(14), prompt(room - 55), prompt(16)]
    judged = []

    async def accept(response) -> bool:
        judged.append(room - len(response.prompt_token_ids))
        return room - len(response.prompt_token_ids) in (40, 50, 55)

    before = sampler.metrics()
    accepted = await within(sampler.sample_groups(prompts, {'ignore_eos': True}, num_samples=4, accept=accept,
                                                  target=2, over_sample=2.0), 300)
    after = sampler.metrics()
    assert [room - len(r.prompt_token_ids) for r in accepted] == [40, 50] and judged == [40, 45, 50]
    assert all(len(r.sequences) == 4 and {len(s.tokens) for s in r.sequences} == {room - len(r.prompt_token_ids)}
               for r in accepted)
    assert after['rejected_groups'] - before['rejected_groups'] == 1
    assert after['aborted_groups'] - before['aborted_groups'] == 2
    await within(counters_when(sampler, lambda s: s.running == 0 and s.used_slots == 0 and s.waiting == 0))
    used = after['generated_tokens'] - before['generated_tokens']
    to_completion = 4 * sum(room - len(p['input_ids']) for p in prompts)
    assert used < to_completion
    print(f'\nsample_groups ({sampler.engine_kind}): {used} tokens generated vs {to_completion} to sample every group '
          f'to completion: {1 - used / to_completion:.0%} saved')
