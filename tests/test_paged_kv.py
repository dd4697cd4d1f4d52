"""The native runner's paged KV cache: the samples of a request hold their prompt's blocks once, prompts share cached
prefixes (never across weight versions or adapters), requests wait for memory, and no block outlives its use. Each
count is the block pool's own; each output is checked against HF ``generate`` (float32, greedy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from safetensors.torch import load_file

from twinkle_async import AsyncSampler
from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.errors import InvalidRequestError

from conftest import assert_all_blocks_returned, counters_when, hf_greedy, load_hf, on_each_step, within

BLOCK = 16
PROMPT = [int(t) for t in torch.randint(10, 1000, (100,), generator=torch.Generator().manual_seed(7))]
GREEDY = {'max_tokens': 8, 'temperature': 0, 'ignore_eos': True}
ARGS = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': 16, 'block_size': BLOCK}


@pytest_asyncio.fixture(scope='module')
async def paged(tiny_model_dir: Path):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=ARGS) as sampler:
        assert sampler.engine.core.parts.name == 'native'
        yield sampler


@pytest.fixture(scope='module')
def expected(tiny_model_dir: Path) -> list[int]:
    return hf_greedy(load_hf(tiny_model_dir), PROMPT, GREEDY['max_tokens'])


def spy_pool(sampler) -> list[tuple[int, list[tuple[int, int]]]]:
    """Before each forward (on the engine thread): blocks referenced, and each chunk's (start, end)."""
    seen: list[tuple[int, list[tuple[int, int]]]] = []
    core = sampler.engine.core
    on_each_step(sampler, lambda rows, chunks: seen.append((core.cache.pool.used, [(c.start, c.end) for c in chunks])))
    return seen


@pytest.mark.parametrize('budget', [4096, 48], ids=['whole', 'chunked'])
async def test_the_samples_of_a_request_hold_the_prompt_blocks_once(tiny_model_dir, expected, budget):
    args = {**ARGS, 'max_num_batched_tokens': budget}
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=args) as sampler:
        seen = spy_pool(sampler)
        response = await within(sampler.sample({'input_ids': PROMPT}, {**GREEDY, 'num_samples': 8}))
        assert [s.tokens for s in response.sequences] == [expected] * 8
        decoding = [used for used, chunks in seen if not chunks]
        # 6 full prompt blocks once, and each sample's own copy of the partial 7th (positions 96..107 fit in it)
        assert decoding and set(decoding) == {6 + 8}, seen
        assert max(used for used, _ in seen) <= 6 + 8 + 1, 'while prefilling, at most the staged partial block more'
        assert_all_blocks_returned(sampler)


async def test_a_shared_prefix_is_prefilled_once_and_served_from_the_cache(paged, expected):
    before = await within(paged.engine.stats())
    seen = spy_pool(paged)
    first = await within(paged.sample({'input_ids': PROMPT}, GREEDY))
    second = await within(paged.sample({'input_ids': PROMPT}, GREEDY))
    after = await within(paged.engine.stats())
    assert first.sequences[0].tokens == second.sequences[0].tokens == expected
    chunks = [chunk for _, step_chunks in seen for chunk in step_chunks]
    assert chunks == [(0, 100), (96, 100)], 'the second prompt computed only its last, partial block'
    assert after.prefix_cache_hits - before.prefix_cache_hits == 96
    assert after.prefix_cache_queries - before.prefix_cache_queries == 200
    assert_all_blocks_returned(paged)


async def test_a_next_turn_reads_the_blocks_the_previous_turn_generated(paged, tiny_model_dir):
    first = await within(paged.sample({'input_ids': PROMPT}, {**GREEDY, 'max_tokens': 40}))
    generated = first.sequences[0].tokens
    next_turn = PROMPT + generated + list(range(300, 310))  # the reply, then the user's next message
    seen = spy_pool(paged)
    second = await within(paged.sample({'input_ids': next_turn}, GREEDY))
    # 139 positions were cached (the last token is sampled, never fed): 8 full blocks, 6 of them the prompt's
    assert [chunk for _, step_chunks in seen for chunk in step_chunks] == [(128, 150)]
    assert second.sequences[0].tokens == hf_greedy(load_hf(tiny_model_dir), next_turn, GREEDY['max_tokens'])
    assert_all_blocks_returned(paged)


async def test_after_a_weight_update_the_cache_is_never_hit(paged, tiny_model_dir, tiny_model_b_dir):
    await within(paged.sample({'input_ids': PROMPT}, GREEDY))
    hits = (await within(paged.engine.stats())).prefix_cache_hits
    await within(paged.update_weights(load_file(str(tiny_model_b_dir / 'model.safetensors'))))
    try:
        seen = spy_pool(paged)
        response = await within(paged.sample({'input_ids': PROMPT}, GREEDY))
        assert (await within(paged.engine.stats())).prefix_cache_hits == hits
        assert [chunk for _, step_chunks in seen for chunk in step_chunks] == [(0, 100)]
        assert response.sequences[0].tokens == hf_greedy(load_hf(tiny_model_b_dir), PROMPT, GREEDY['max_tokens'])
    finally:
        await within(paged.update_weights(load_file(str(tiny_model_dir / 'model.safetensors'))))
    assert_all_blocks_returned(paged)


async def test_an_adapter_never_reads_the_base_model_prefix(paged, tiny_model_dir, lora_dirs, expected):
    await within(paged.add_adapter('a', lora_dirs['a']))
    try:
        await within(paged.sample({'input_ids': PROMPT}, GREEDY))
        hits = (await within(paged.engine.stats())).prefix_cache_hits
        response = await within(paged.sample({'input_ids': PROMPT}, GREEDY, 'a'))
        assert (await within(paged.engine.stats())).prefix_cache_hits == hits
        reference = load_hf(tiny_model_dir, lora_dirs['a'])
        assert response.sequences[0].tokens == hf_greedy(reference, PROMPT, GREEDY['max_tokens'])
    finally:
        await within(paged.remove_adapter('a'))


async def test_reset_prefix_cache_forgets_every_block(paged):
    await within(paged.sample({'input_ids': PROMPT}, GREEDY))
    assert paged.engine.core.cache.pool.cached
    await within(paged.reset_prefix_cache())
    assert not paged.engine.core.cache.pool.cached
    hits = (await within(paged.engine.stats())).prefix_cache_hits
    await within(paged.sample({'input_ids': PROMPT}, GREEDY))
    assert (await within(paged.engine.stats())).prefix_cache_hits == hits


async def test_requests_wait_for_blocks_and_one_that_can_never_fit_is_refused(tiny_model_dir, expected):
    blocks = 24  # one request needs 7 (prompt) + 1 (its sample's growth): three fit at once
    budget = SlotKVCache.bytes_per_token(load_hf(tiny_model_dir)) * BLOCK * blocks
    args = {**ARGS, 'kv_cache_memory_bytes': budget, 'max_model_len': 256}
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=args) as sampler:
        assert sampler.engine.core.cache.pool.num_blocks == blocks
        seen = spy_pool(sampler)
        prompts = [{'input_ids': [t + i for t in PROMPT]} for i in range(6)]
        await within(sampler.pause('abort'))  # all six wait, then reach the scheduler together
        tasks = [asyncio.ensure_future(sampler.sample(p, GREEDY)) for p in prompts]
        await within(counters_when(sampler, lambda stats: stats.waiting == 6))
        await within(sampler.resume())
        responses = await within(asyncio.gather(*tasks))
        assert responses[0].sequences[0].tokens == expected
        assert max(used for used, _ in seen) <= blocks
        assert max(len(chunks) for _, chunks in seen) == 3, 'three prompts admitted at once, the rest waited'
        with pytest.raises(InvalidRequestError, match='kv_cache_memory_bytes'):
            await within(sampler.sample({'input_ids': PROMPT}, {**GREEDY, 'num_samples': 8, 'max_tokens': 150}))
        assert_all_blocks_returned(sampler)


async def test_aborted_requests_give_every_block_back(tiny_model_dir):
    args = {**ARGS, 'max_num_batched_tokens': 48}
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=args) as sampler:
        reached = asyncio.Event()
        core = sampler.engine.core
        original = core.runner.step

        def step(rows, chunks):
            if rows >= 4 and core.scheduler.staged is not None:  # samples decoding and a prompt half prefilled
                reached.set()
            return original(rows, chunks)
        core.runner.step = step
        running = asyncio.create_task(sampler.sample({'input_ids': PROMPT}, {**GREEDY, 'num_samples': 4,
                                                                             'max_tokens': 400}))
        staged = asyncio.create_task(sampler.sample({'input_ids': PROMPT * 2}, {**GREEDY, 'max_tokens': 400}))
        await within(reached.wait())
        running.cancel()
        staged.cancel()
        await asyncio.gather(running, staged, return_exceptions=True)
        stats = await within(sampler.engine.stats())
        assert (stats.running, stats.used_slots, stats.kv_usage) == (0, 0, 0.0)
        assert_all_blocks_returned(sampler)


async def test_without_the_kernel_decode_reads_gathered_blocks_and_agrees(tiny_model_dir, expected, monkeypatch):
    monkeypatch.setenv('TWINKLE_ASYNC_NO_KERNELS', '1')  # SDPA over each row's blocks gathered (CUDA's path too)
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=ARGS) as sampler:
        assert sampler.engine.core.parts.forward.kernel is None
        response = await within(sampler.sample({'input_ids': PROMPT}, {**GREEDY, 'num_samples': 3}))
        assert [s.tokens for s in response.sequences] == [expected] * 3
        assert_all_blocks_returned(sampler)
