"""Reliability: 40 distinct bad inputs, each a typed error naming the problem; the engine keeps serving.

Requests (inputs, trajectories, SamplingParams), adapters, weight updates, engine_args and model ids, on
every engine, while good requests are in flight.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from twinkle_async import AsyncSampler
from twinkle_async.errors import (
    AdapterNotFoundError,
    EngineArgsError,
    InvalidAdapterError,
    InvalidInputError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelNotFoundError,
    PromptTooLongError,
    WeightUpdateError,
)

from conftest import chat, within

USER = {'role': 'user', 'content': 'x'}
REQUESTS = [  # (input, sampling params, error, words in the message)
    ({'input_ids': []}, None, InvalidInputError, 'empty'),
    ({'input_ids': [1, 2, 10**7]}, None, InvalidInputError, 'vocabulary'),
    ({'input_ids': [-1]}, None, InvalidInputError, 'vocabulary'),
    ({'input_ids': [5] * 600}, None, PromptTooLongError, 'max_model_len'),
    ({'input_ids': ['a', 'b']}, None, InvalidInputError, 'ints'),
    ({'input_ids': [True, False]}, None, InvalidInputError, 'ints'),
    ('just a string', None, InvalidInputError, 'InputFeature'),
    ({'messages': []}, None, InvalidInputError, 'no messages'),
    ({'tools': []}, None, InvalidInputError, 'no messages'),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, None, InvalidInputError, 'role'),
    ({'messages': ['hi']}, None, InvalidInputError, r'messages\[0\] must be a dict'),
    ({'messages': [{'role': 'user', 'content': 5}]}, None, InvalidInputError, 'content must be a string'),
    ({'messages': [USER], 'tools': 'calc'}, None, InvalidInputError, 'tools'),
    ({'messages': [USER], 'tools': [{'description': 'no name'}]}, None, InvalidInputError, 'tool_name'),
    ({'messages': [{'role': 'assistant', 'content': '', 'tool_calls': 'x'}]}, None, InvalidInputError, 'tool_calls'),
    (chat('hi'), {'temperature': -0.5}, InvalidSamplingParamsError, 'temperature'),
    (chat('hi'), {'temperature': float('nan')}, InvalidSamplingParamsError, 'temperature'),
    (chat('hi'), {'top_p': 0}, InvalidSamplingParamsError, 'top_p'),
    (chat('hi'), {'top_k': -5}, InvalidSamplingParamsError, 'top_k'),
    (chat('hi'), {'max_tokens': 0}, InvalidSamplingParamsError, 'max_tokens'),
    (chat('hi'), {'max_tokens': 'ten'}, InvalidSamplingParamsError, 'max_tokens'),
    (chat('hi'), {'max_tokens': 4, 'temprature': 1}, InvalidSamplingParamsError, 'temprature'),
    (chat('hi'), {'logprobs': -1}, InvalidSamplingParamsError, 'logprobs'),
    (chat('hi'), {'prompt_logprobs': 99}, InvalidSamplingParamsError, 'prompt_logprobs'),
    (chat('hi'), {'repetition_penalty': 0}, InvalidSamplingParamsError, 'repetition_penalty'),
    (chat('hi'), {'seed': 'x'}, InvalidSamplingParamsError, 'seed'),
    (chat('hi'), {'stop': 5}, InvalidSamplingParamsError, 'stop'),
    (chat('hi'), {'stop': [10**7]}, InvalidSamplingParamsError, 'stop'),
    (chat('hi'), {'num_samples': 0}, InvalidSamplingParamsError, 'num_samples'),
    (chat('hi'), {'num_samples': 10**4}, InvalidRequestError, 'num_samples=10000 exceeds'),
    (chat('hi'), 'not params', InvalidSamplingParamsError, 'sampling_params must be'),
]


def update_payloads() -> list[tuple[object, str]]:
    q = 'model.layers.0.self_attn.q_proj.weight'
    return [({'model.layers.9.mlp.up_proj.weight': torch.zeros(256, 128)}, 'not a weight'),
            ({q: torch.zeros(3, 3)}, 'shape'),
            ({q: torch.zeros(128, 128, dtype=torch.int64)}, 'floating-point'),
            ({q: [[0.0]]}, 'torch.Tensor'),
            ([torch.zeros(1)], 'mapping or')]


async def test_forty_bad_inputs_fail_alone_and_the_engine_keeps_serving(sampler, lora_dirs, tmp_path):
    good = [asyncio.create_task(sampler.sample(chat(f'good {i}'), {'max_tokens': 24, 'ignore_eos': True, 'seed': i}))
            for i in range(8)]
    version = sampler.weight_version
    checked = 0
    for item, params, error, words in REQUESTS:
        with pytest.raises(error, match=words):
            await within(sampler.sample(item, params))
        checked += 1
    for payload, words in update_payloads():
        with pytest.raises(WeightUpdateError, match=words):
            await within(sampler.update_weights(payload))
        checked += 1
    with pytest.raises(AdapterNotFoundError, match='ghost'):
        await within(sampler.sample(chat('hi'), {'max_tokens': 2}, adapter_name='ghost'))
    (tmp_path / 'adapter_config.json').write_text((lora_dirs['a'] / 'adapter_config.json').read_text())
    (tmp_path / 'adapter_model.bin').write_bytes(b'pickle is refused')
    with pytest.raises(InvalidAdapterError, match='pickle'):
        await within(sampler.add_adapter('p', tmp_path))
    with pytest.raises(InvalidAdapterError, match='letters, digits'):
        await within(sampler.add_adapter('bad name!', lora_dirs['a']))
    with pytest.raises(InvalidRequestError, match='pause mode'):
        await within(sampler.pause('later'))
    checked += 4
    assert checked >= 40 and sampler.weight_version == version
    for response in await within(asyncio.gather(*good)):
        assert len(response.sequences[0].tokens) == 24
    assert (await within(sampler.engine.stats())).used_slots == 0


@pytest.mark.parametrize('engine', ['torch', 'vllm'])
@pytest.mark.parametrize('engine_args, words', [({'max_num_seq_typo': 2}, 'max_num_seq_typo'),
                                                 ({'dtype': 'float8'}, 'dtype')])
async def test_bad_engine_args_are_named(tiny_model_dir, engine, engine_args, words):
    with pytest.raises(EngineArgsError, match=words):
        await within(AsyncSampler(str(tiny_model_dir), engine=engine, engine_args=engine_args).start())


@pytest.mark.parametrize('model_id', ['/no/such/model', 'hf://no-org/no-model-xyz', 'ms://no-org/no-model-xyz'])
async def test_model_ids_that_cannot_be_resolved_are_named(model_id):
    with pytest.raises(ModelNotFoundError, match=model_id.split('//')[-1]):
        await within(AsyncSampler(model_id).start(), 60)
