"""Engine contract: greedy parity with transformers, logprobs, seeds, stops (run on every engine)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from twinkle_async import SamplingParams

from conftest import chat, hf_greedy, within

PROMPTS = ['def main():\n    ', 'import os\nimport sys\n', 'class Foo(object):', 'return self._',
           '# Copyright', 'for i in range(10):\n', 'x = {', 'raise ValueError(']


def encode(sampler, text: str) -> list[int]:
    return sampler.template.encode(chat(text))['input_ids']


async def test_greedy_matches_transformers_generate_in_a_batch(sampler, hf_tiny):
    params = SamplingParams(max_tokens=24, temperature=0)
    responses = await within(sampler.sample([chat(p) for p in PROMPTS], params))
    for prompt, response in zip(PROMPTS, responses):
        expected = hf_greedy(hf_tiny[0], encode(sampler, prompt), 24)
        assert response.sequences[0].tokens == expected, prompt


async def test_stop_reasons_length_and_new_input_feature(sampler):
    response = await within(sampler.sample(chat('x = 1'), {'max_tokens': 5, 'temperature': 0, 'ignore_eos': True}))
    sequence = response.sequences[0]
    assert sequence.stop_reason == 'length' and len(sequence.tokens) == 5
    assert sequence.new_input_feature['input_ids'] == response.prompt_token_ids + sequence.tokens


async def test_logprobs_equal_full_forward_log_softmax(sampler, hf_tiny):
    model, _ = hf_tiny
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=3, logprobs=4, prompt_logprobs=2, ignore_eos=True)
    response = await within(sampler.sample(chat('def f(x):'), params))
    sequence = response.sequences[0]
    prompt = response.prompt_token_ids
    full = torch.tensor([prompt + sequence.tokens])
    with torch.no_grad():
        reference = torch.log_softmax(model(full).logits[0].float(), dim=-1)
    assert len(sequence.logprobs) == len(sequence.tokens) == params.max_tokens
    for i, (token, row) in enumerate(zip(sequence.tokens, sequence.logprobs)):
        expected = reference[len(prompt) - 1 + i]
        assert row[0][0] == token, 'the sampled token comes first'
        assert abs(row[0][1] - expected[token].item()) < 1e-5
        top = row[1:]
        assert len(top) == 4 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert [t for t, _ in top] == expected.topk(4).indices.tolist()
        for t, lp in top:
            assert abs(lp - expected[t].item()) < 1e-5
    assert response.prompt_logprobs[0] is None and response.topk_prompt_logprobs[0] is None
    assert len(response.prompt_logprobs) == len(response.topk_prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(response.prompt_logprobs[i] - reference[i - 1, prompt[i]].item()) < 1e-5
        top = response.topk_prompt_logprobs[i]
        assert [t for t, _ in top] == reference[i - 1].topk(2).indices.tolist()
        assert max(abs(lp - reference[i - 1, t].item()) for t, lp in top) < 1e-5


async def test_logprobs_zero_gives_only_the_sampled_token(sampler):
    response = await within(sampler.sample(chat('a'), {'max_tokens': 4, 'logprobs': 0, 'seed': 1}))
    sequence = response.sequences[0]
    assert [len(row) for row in sequence.logprobs] == [1] * len(sequence.tokens)
    assert [row[0][0] for row in sequence.logprobs] == sequence.tokens
    top4 = (await within(sampler.sample(chat('a'), {'max_tokens': 4, 'logprobs': 4, 'seed': 1}))).sequences[0]
    assert top4.tokens == sequence.tokens
    assert max(abs(row[0][1] - wide[0][1]) for row, wide in zip(sequence.logprobs, top4.logprobs)) < 1e-5


MIXED = [
    {'temperature': 0}, {'temperature': 0.7, 'top_k': 5}, {'temperature': 1.2, 'top_p': 0.8},
    {'temperature': 1.0, 'repetition_penalty': 1.3}, {'temperature': 0.5, 'seed': 11},
]


async def test_same_seed_same_tokens_alone_and_in_a_mixed_batch(sampler):
    params = {'max_tokens': 20, 'temperature': 0.9, 'top_p': 0.95, 'seed': 1234, 'ignore_eos': True}
    alone = await within(sampler.sample(chat('import json'), params))
    crowd = [sampler.sample(chat(PROMPTS[i % len(PROMPTS)]), {**MIXED[i % len(MIXED)], 'max_tokens': 5 + i})
             for i in range(15)]
    together, *_ = await within(asyncio.gather(sampler.sample(chat('import json'), params), *crowd))
    assert together.sequences[0].tokens == alone.sequences[0].tokens


async def test_num_samples_under_one_seed_are_distinct_and_reproducible(sampler):
    params = {'max_tokens': 12, 'temperature': 1.0, 'seed': 7, 'ignore_eos': True}
    first = await within(sampler.sample(chat('hello'), params, num_samples=4))
    second = await within(sampler.sample(chat('hello'), params, num_samples=4))
    tokens = [tuple(s.tokens) for s in first.sequences]
    assert len(set(tokens)) == 4
    assert tokens == [tuple(s.tokens) for s in second.sequences]


async def test_stream_and_one_shot_give_identical_tokens(sampler):
    params = {'max_tokens': 16, 'temperature': 1.0, 'seed': 99, 'ignore_eos': True}
    one_shot = await within(sampler.sample(chat('while True:'), params, num_samples=2))

    async def collect() -> tuple[dict[int, list[int]], dict[int, str], dict[int, str]]:
        tokens: dict[int, list[int]] = {0: [], 1: []}
        texts: dict[int, str] = {0: '', 1: ''}
        reasons: dict[int, str] = {}
        async for delta in sampler.stream(chat('while True:'), params, num_samples=2):
            tokens[delta.index] += delta.token_ids
            texts[delta.index] += delta.text
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason
        return tokens, texts, reasons

    tokens, texts, reasons = await within(collect())
    for i, sequence in enumerate(one_shot.sequences):
        assert tokens[i] == sequence.tokens and texts[i] == sequence.decoded
        assert reasons[i] == sequence.stop_reason == 'length'


async def test_multi_token_stop_string_stops_and_is_cut_from_text(sampler):
    params = {'max_tokens': 40, 'temperature': 0, 'ignore_eos': True}
    free = (await within(sampler.sample(chat('def main():'), params))).sequences[0]
    pieces = [sampler.template.decode([t]) for t in free.tokens]
    start = next(i for i in range(2, len(pieces) - 3) if all(pieces[i:i + 3]))
    stop = ''.join(pieces[start:start + 3])
    cut = free.decoded.index(stop)
    stopped = (await within(sampler.sample(chat('def main():'), {**params, 'stop': [stop]}))).sequences[0]
    assert stopped.stop_reason == 'stop'
    assert stopped.decoded == free.decoded[:cut]
    assert stopped.tokens == free.tokens[:len(stopped.tokens)] and len(stopped.tokens) < len(free.tokens)
    kept = (await within(sampler.sample(chat('def main():'), {**params, 'stop': stop,
                                                                   'include_stop_str_in_output': True})))
    assert kept.sequences[0].decoded == free.decoded[:cut + len(stop)]

    async def streamed_text() -> str:
        return ''.join([delta.text async for delta in sampler.stream(chat('def main():'), {**params, 'stop': [stop]})])

    streamed = await within(streamed_text())
    assert streamed == stopped.decoded, 'a stream never shows the beginning of a stop string'


async def test_stop_token_id_stops_with_the_token_included(sampler):
    params = {'max_tokens': 30, 'temperature': 0, 'ignore_eos': True}
    free = (await within(sampler.sample(chat('import os'), params))).sequences[0]
    stop_id = free.tokens[5]
    first = free.tokens.index(stop_id)
    stopped = (await within(sampler.sample(chat('import os'), {**params, 'stop': [stop_id]}))).sequences[0]
    assert stopped.stop_reason == 'stop' and stopped.tokens == free.tokens[:first + 1]


@pytest.mark.parametrize('penalty', [1.5, 0.7])
async def test_repetition_penalty_matches_hf_generate(sampler, hf_tiny, penalty):
    model, _ = hf_tiny
    prompt = sampler.template.encode(chat('aaaa'))['input_ids']
    penalized = await within(sampler.sample({'input_ids': prompt}, {'max_tokens': 30, 'temperature': 0,
                                                                    'ignore_eos': True, 'repetition_penalty': penalty}))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                  repetition_penalty=penalty)[0, len(prompt):].tolist()
    assert penalized.sequences[0].tokens == expected
    assert expected != hf_greedy(model, prompt, 30), 'the penalty changes the greedy answer'


async def test_top_k_one_and_tiny_top_p_are_greedy(sampler):
    greedy = await within(sampler.sample(chat('if x:'), {'max_tokens': 12, 'temperature': 0, 'ignore_eos': True}))
    top_k = await within(sampler.sample(chat('if x:'), {'max_tokens': 12, 'top_k': 1, 'seed': 5, 'ignore_eos': True}))
    top_p = await within(sampler.sample(chat('if x:'), {'max_tokens': 12, 'top_p': 1e-6, 'seed': 5,
                                                        'ignore_eos': True}))
    assert top_k.sequences[0].tokens == greedy.sequences[0].tokens == top_p.sequences[0].tokens
