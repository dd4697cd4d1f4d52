"""Admission by expected length, and preemption, on the native runner's paged cache. A fresh engine admits a
request only when its samples fit to ``max_tokens``; once samples have finished early, it expects the next ones to
be as short and admits more at once. When the pool then runs short, the newest sample is preempted (its blocks
freed) and computed again once memory is free, and its rollout goes on as if nothing happened: greedy tokens equal HF
``generate`` (float32), seeded samples draw the tokens they draw in a pool that never runs short. Counts are the
block pool's and the scheduler's own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from twinkle_async import AsyncSampler
from twinkle_async.engines.base import EngineRequest, RequestParams
from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.engines.torch.paged_cache import PagedKVCache
from twinkle_async.engines.torch.scheduler import Chunk, Scheduler
from twinkle_async.engines.torch.sequence import Request

from conftest import assert_all_blocks_returned, counters_when, hf_greedy, load_hf, on_each_step, within

BLOCK = 16
BLOCKS = 24
PROMPT = [int(t) for t in torch.randint(10, 1000, (100,), generator=torch.Generator().manual_seed(7))]
PROMPTS = [PROMPT, [t + 1 for t in PROMPT]]
# each request: 7 prompt blocks + 2 x 4 blocks for its samples' 60 tokens = 15 of the 24; both at once need 30
PARAMS = {'max_tokens': 60, 'num_samples': 2, 'temperature': 0, 'ignore_eos': True}
WARMUP = [t + 2 for t in PROMPT[:20]]


def engine_args(tiny_model_dir: Path, blocks: int) -> dict:
    budget = SlotKVCache.bytes_per_token(load_hf(tiny_model_dir)) * BLOCK * blocks
    return {'dtype': 'float32', 'max_model_len': 256, 'max_num_seqs': 8, 'block_size': BLOCK,
            'kv_cache_memory_bytes': budget}


async def expect_short_samples(sampler, hf) -> None:
    """A sample that stops (a stop token) after 2 of its ``max_tokens``: the engine now expects samples to
    generate about 1% of theirs."""
    tokens = hf_greedy(hf, WARMUP, 8, ignore_eos=True)
    stop = next(t for k, t in enumerate(tokens) if k >= 1 and t not in tokens[:k])
    response = await within(sampler.sample({'input_ids': WARMUP}, {'max_tokens': 400, 'temperature': 0,
                                                                    'stop': [stop]}))
    assert response.sequences[0].stop_reason == 'stop'
    room = sampler.engine.core.processor.max_model_len - len(WARMUP)  # max_tokens as the engine got it
    assert sampler.engine.core.scheduler.expected_share == len(response.sequences[0].tokens) / min(400, room)


def spy(sampler) -> list[dict]:
    """Before each forward (on the engine thread): blocks referenced, each chunk's (prompt, sample index or None,
    start, end), and the preempted samples' (prompt, index); a prompt is its index in ``PROMPTS``."""
    seen: list[dict] = []
    core = sampler.engine.core
    on_each_step(sampler, lambda rows, chunks: seen.append({
        'used': core.cache.pool.used,
        'chunks': [(PROMPTS.index(c.request.prompt_token_ids), c.sample and c.sample.index, c.start, c.end)
                   for c in chunks],
        'preempted': [(PROMPTS.index(s.request.prompt_token_ids), s.index) for s in core.scheduler.preempted]}))
    return seen


async def sample_together(sampler, params: dict) -> list:
    """Both prompts, reaching the scheduler in the same step, in order (held by a pause until both are there)."""
    await within(sampler.pause('abort'))
    tasks = []
    for prompt in PROMPTS:
        tasks.append(asyncio.ensure_future(sampler.sample({'input_ids': prompt}, params)))
        await within(counters_when(sampler, lambda stats: stats.waiting == len(tasks)))
    await within(sampler.resume())
    return await within(asyncio.gather(*tasks))


@pytest.fixture(scope='module')
def hf(tiny_model_dir: Path):
    return load_hf(tiny_model_dir)


@pytest.fixture(scope='module')
def expected(hf) -> list[list[int]]:
    return [hf_greedy(hf, prompt, 60, ignore_eos=True) for prompt in PROMPTS]


async def test_a_fresh_engine_admits_what_fits_to_max_tokens_and_never_preempts(tiny_model_dir, expected):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=engine_args(tiny_model_dir, BLOCKS)) \
            as sampler:
        assert sampler.engine.core.cache.pool.num_blocks == BLOCKS
        seen = spy(sampler)
        responses = await sample_together(sampler, PARAMS)
        stats = await within(sampler.engine.stats())
        assert_all_blocks_returned(sampler)
    assert [s.tokens for r in responses for s in r.sequences] == [e for e in expected for _ in range(2)]
    assert [(c[0], c[2], c[3]) for c in seen[0]['chunks']] == [(0, 0, 100)], 'the second request waited'
    assert stats.preemptions == 0


async def test_more_samples_run_than_fit_to_the_end_and_a_preempted_one_finishes_exactly(tiny_model_dir, hf,
                                                                                         expected):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=engine_args(tiny_model_dir, BLOCKS)) \
            as sampler:
        await expect_short_samples(sampler, hf)
        seen = spy(sampler)
        responses = await sample_together(sampler, PARAMS)
        stats = await within(sampler.engine.stats())
        assert_all_blocks_returned(sampler)
    assert [s.tokens for r in responses for s in r.sequences] == [e for e in expected for _ in range(2)]
    assert [(c[0], c[2], c[3]) for c in seen[0]['chunks']] == [(0, 0, 100), (1, 0, 100)], \
        'both requests were admitted at once, expected to stop early'
    preempted = {sample for step in seen for sample in step['preempted']}
    assert stats.preemptions >= 1 and preempted
    assert all(prompt == 1 for prompt, _ in preempted), 'the newest request gave way'
    resumed = [c for step in seen for c in step['chunks'] if c[1] is not None]
    assert {(c[0], c[1]) for c in resumed} == preempted, 'every preempted sample was computed again'
    assert all(start >= 96 for _, _, start, _ in resumed), 'its prompt blocks came from the prefix cache'
    assert max(step['used'] for step in seen) <= BLOCKS


async def test_a_seeded_sample_draws_the_same_tokens_when_preempted(tiny_model_dir, hf):
    params = {**PARAMS, 'temperature': 1.0, 'seed': 5}
    results = []
    for blocks in (BLOCKS, 64):
        async with AsyncSampler(str(tiny_model_dir), engine='torch',
                                engine_args=engine_args(tiny_model_dir, blocks)) as sampler:
            await expect_short_samples(sampler, hf)
            responses = await sample_together(sampler, params)
            results.append(([[s.tokens for s in r.sequences] for r in responses],
                            (await within(sampler.engine.stats())).preemptions))
            assert_all_blocks_returned(sampler)
    (short_pool, preemptions), (roomy_pool, none) = results
    assert preemptions >= 1 and none == 0
    assert short_pool == roomy_pool


async def test_a_request_aborted_while_preempted_gives_every_block_back(tiny_model_dir, hf, expected):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=engine_args(tiny_model_dir, BLOCKS)) \
            as sampler:
        await expect_short_samples(sampler, hf)
        core = sampler.engine.core
        resumed = []

        def step(rows, chunks):  # the abort is handled before the next step: the sample is still preempted then
            if core.scheduler.preempted and not core.aborted:
                core.abort(core.scheduler.preempted[0].request.request_id)
            resumed.extend(c for c in chunks if c.sample is not None)
        on_each_step(sampler, step)
        first, second = await sample_together(sampler, PARAMS)
        stats = await within(sampler.engine.stats())
        assert (stats.aborted, stats.preemptions, stats.running, stats.used_slots) == (1, 1, 0, 0)
        assert not core.scheduler.preempted and not resumed, 'the aborted sample was never computed again'
        assert_all_blocks_returned(sampler)
    assert [s.tokens for s in first.sequences] == [expected[0]] * 2
    assert [s.stop_reason for s in second.sequences] == ['abort', 'abort']
    assert len(second.sequences[1].tokens) < 60, 'the preempted sample ended where it stopped'


async def test_a_prompt_being_prefilled_in_chunks_gives_way_to_older_samples_and_starts_over(tiny_model_dir, hf):
    short = [int(t) for t in torch.randint(10, 1000, (31,), generator=torch.Generator().manual_seed(1))]
    long = [int(t) for t in torch.randint(10, 1000, (300,), generator=torch.Generator().manual_seed(2))]
    # the short request holds 4 blocks, the long one reserves 20 (19 prompt + its sample's first): 24 fill the pool,
    # and the short request's second sample needs a block when it writes position 32 (the third step)
    args = {**engine_args(tiny_model_dir, BLOCKS), 'max_model_len': 360, 'max_num_batched_tokens': 64}
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=args) as sampler:
        chunks: list[tuple[int, int, int]] = []
        await expect_short_samples(sampler, hf)
        on_each_step(sampler, lambda rows, step_chunks: chunks.extend(
            (len(c.request.prompt_token_ids), c.start, c.end) for c in step_chunks))
        await within(sampler.pause('abort'))
        first = asyncio.ensure_future(sampler.sample({'input_ids': short}, {**PARAMS, 'max_tokens': 120}))
        await within(counters_when(sampler, lambda stats: stats.waiting == 1))
        second = asyncio.ensure_future(sampler.sample({'input_ids': long}, {**PARAMS, 'num_samples': 1}))
        await within(counters_when(sampler, lambda stats: stats.waiting == 2))
        await within(sampler.resume())
        responses = await within(asyncio.gather(first, second))
        stats = await within(sampler.engine.stats())
        assert_all_blocks_returned(sampler)
    long_chunks = [(start, end) for length, start, end in chunks if length == len(long)]
    assert long_chunks[:2] == [(0, 33), (33, 97)] and stats.preemptions == 1
    assert long_chunks[2][0] < 97 and long_chunks[-1][1] == len(long), 'staged again, from what stayed cached'
    assert [s.tokens for s in responses[0].sequences] == [hf_greedy(hf, short, 120, ignore_eos=True)] * 2
    assert responses[1].sequences[0].tokens == hf_greedy(hf, long, 60, ignore_eos=True)


def test_samples_of_one_request_resumed_together_compute_their_prompt_once(tiny_model_dir):
    """The scheduler over a real paged cache (no model): two preempted samples of a request whose prompt left the
    cache; the first computes it, the second waits a step and finds its full blocks cached."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cache = PagedKVCache(num_layers=1, num_slots=5, num_kv_heads=1, head_dim=4, max_len=256, num_blocks=40,
                         block_size=BLOCK, dtype=torch.float32, device=torch.device('cpu'))
    scheduler = Scheduler(cache, num_slots=4, max_batched_tokens=4096, staging_slot=4, move_row=lambda *_: None)
    params = RequestParams(max_tokens=60, num_samples=2, temperature=0)
    request = Request.from_engine_request(EngineRequest('r', PROMPT, params), tokenizer)
    scheduler.add(request)
    scheduler.waiting.clear()  # it ran: its two samples generated 10 tokens each, then were preempted
    for sample in request.samples:
        sample.output_ids = [sample.index * 100 + i for i in range(10)]
        scheduler.preempted.append(sample)

    def run(chunks: list[Chunk]) -> None:  # what the engine's step does with the cache once the chunks ran
        for chunk in chunks:
            cache.grow(chunk.slot, chunk.end)
            cache.commit(chunk.slot, chunk.tokens, chunk.end)
            assert chunk.sample is not None and chunk.completes
            scheduler.resume(chunk.sample)

    first = scheduler.schedule()
    assert [(c.sample.index, c.start, c.end) for c in first if c.sample] == [(0, 0, 109)]
    run(first)
    second = scheduler.schedule()
    assert [(c.sample.index, c.start, c.end) for c in second if c.sample] == [(1, 96, 109)]
    run(second)
    assert [s.slot for s in scheduler.running] == [0, 1] and not scheduler.preempted
