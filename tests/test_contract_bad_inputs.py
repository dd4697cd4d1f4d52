"""Engine contract: each bad input fails alone with a typed error; good requests in flight finish."""

from __future__ import annotations

import asyncio

import pytest

from twinkle_async import AsyncSampler, SamplingParams
from twinkle_async.errors import (
    AdapterNotFoundError,
    InvalidInputError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    ModelNotFoundError,
    PromptTooLongError,
    TemplateNotFoundError,
)

from conftest import chat, counters_when, within

BAD_REQUESTS = [
    ('empty input_ids', {'input_ids': []}, None, InvalidInputError, 'empty'),
    ('ids outside the vocabulary', {'input_ids': [1, 2, 10**7]}, None, InvalidInputError, 'vocabulary'),
    ('negative ids', {'input_ids': [-1]}, None, InvalidInputError, 'vocabulary'),
    ('prompt longer than max_model_len', {'input_ids': [5] * 600}, None, PromptTooLongError, 'max_model_len'),
    ('negative temperature', chat('hi'), {'temperature': -0.5}, InvalidSamplingParamsError, 'temperature'),
    ('top_p 0', chat('hi'), {'top_p': 0}, InvalidSamplingParamsError, 'top_p'),
    ('unknown params key', chat('hi'), {'max_tokens': 4, 'temprature': 1}, InvalidSamplingParamsError, 'temprature'),
    ('trajectory with no messages', {'messages': []}, None, InvalidInputError, 'no messages'),
    ('trajectory without messages key', {'tools': []}, None, InvalidInputError, 'no messages'),
    ('message with a bad role', {'messages': [{'role': 'robot', 'content': 'x'}]}, None, InvalidInputError, 'role'),
    ('input_ids not ints', {'input_ids': ['a', 'b']}, None, InvalidInputError, 'ints'),
    ('input not a dict', 'just a string', None, InvalidInputError, 'InputFeature'),
    ('stop id outside the vocabulary', chat('hi'), {'stop': [10**7]}, InvalidSamplingParamsError, 'stop'),
    ('max_tokens 0', chat('hi'), {'max_tokens': 0}, InvalidSamplingParamsError, 'max_tokens'),
    ('num_samples above the slots', chat('hi'), {'num_samples': 10**4}, InvalidRequestError,
     'num_samples=10000 exceeds'),
]


async def test_each_bad_input_fails_alone_while_16_good_requests_finish(sampler):
    good = [asyncio.create_task(sampler.sample(chat(f'good {i}'), {'max_tokens': 200, 'ignore_eos': True, 'seed': i}))
            for i in range(16)]
    await within(counters_when(sampler, lambda s: s.running == 16))
    await within(sampler.pause('keep'))  # all 16 stay in flight while the bad ones come and go
    try:
        for _name, item, params, error, words in BAD_REQUESTS:
            with pytest.raises(error, match=words):
                await within(sampler.sample(item, params))
        with pytest.raises(TemplateNotFoundError, match='no-such-template'):
            sampler.set_template('no-such-template')
        with pytest.raises(AdapterNotFoundError, match='ghost'):
            await within(sampler.sample(chat('hi'), {'max_tokens': 2}, adapter_name='ghost'))
        stats = await within(sampler.engine.stats())
        assert (stats.running, stats.waiting) == (16, 0), 'the bad ones never reached the engine'
    finally:
        await within(sampler.resume())
    for response in await within(asyncio.gather(*good)):
        assert len(response.sequences[0].tokens) == 200 and response.sequences[0].stop_reason == 'length'
    stats = await within(sampler.engine.stats())
    assert stats.used_slots == 0


async def test_a_bad_item_in_a_list_fails_alone_with_return_exceptions(sampler):
    results = await within(sampler.sample([chat('one'), {'input_ids': []}, chat('three')],
                                          {'max_tokens': 3, 'ignore_eos': True}, return_exceptions=True))
    assert isinstance(results[1], InvalidInputError)
    assert [len(r.sequences[0].tokens) for r in (results[0], results[2])] == [3, 3]
    with pytest.raises(InvalidInputError):
        await within(sampler.sample([chat('one'), {'input_ids': []}], {'max_tokens': 3}))


async def test_nonexistent_model_path_is_a_typed_error():
    with pytest.raises(ModelNotFoundError, match='/no/such/model'):
        await within(AsyncSampler('/no/such/model').start())


def test_sampling_params_object_errors_name_the_field():
    with pytest.raises(InvalidSamplingParamsError, match='top_k'):
        SamplingParams(top_k=0)
