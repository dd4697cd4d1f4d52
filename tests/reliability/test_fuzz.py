"""Reliability: hypothesis fuzzes SamplingParams and inputs; only our typed errors come out, the engine lives, and
the valid requests mixed in all succeed with what they asked for."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinkle_async import TorchSampler, vLLMSampler
from twinkle_async.data_format import SampleResponse
from twinkle_async.errors import TwinkleAsyncError

from conftest import ENGINES

pytestmark = pytest.mark.slow

NUMBERS = st.one_of(st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=2))
PARAMS = st.fixed_dictionaries({}, optional={
    'max_tokens': st.one_of(st.integers(-2, 6), st.text(max_size=2)),
    'temperature': NUMBERS, 'top_p': NUMBERS, 'repetition_penalty': NUMBERS,
    'top_k': st.one_of(st.integers(-3, 3000), st.none()),
    'seed': st.one_of(st.none(), st.integers(-5, 2**70)),
    'stop': st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3),
                      st.lists(st.integers(-5, 2000), max_size=3)),
    'logprobs': st.one_of(st.none(), st.integers(-2, 25)), 'prompt_logprobs': st.one_of(st.none(), st.integers(-1, 3)),
    'num_samples': st.integers(-1, 3), 'ignore_eos': st.booleans(), 'include_stop_str_in_output': st.booleans(),
    'bogus_key': st.integers(),
})
MESSAGE = st.fixed_dictionaries({'role': st.sampled_from(['user', 'assistant', 'system', 'tool', 'robot']),
                                 'content': st.one_of(st.text(max_size=12), st.integers(), st.none())})
INPUTS = st.one_of(
    st.fixed_dictionaries({'input_ids': st.lists(st.one_of(st.integers(-3, 1100), st.text(max_size=1)), max_size=8)}),
    st.fixed_dictionaries({'messages': st.lists(MESSAGE, max_size=3)}),
    st.text(max_size=4), st.integers(), st.none())
VALID_PARAMS = st.fixed_dictionaries({'max_tokens': st.integers(1, 6)}, optional={
    'temperature': st.one_of(st.just(0.0), st.floats(0.1, 2.0)), 'top_p': st.floats(0.05, 1.0),
    'top_k': st.sampled_from([-1, 1, 5, 50]), 'repetition_penalty': st.floats(0.5, 2.0),
    'seed': st.integers(0, 2**31), 'logprobs': st.one_of(st.none(), st.integers(0, 5)),
    'num_samples': st.integers(1, 3), 'ignore_eos': st.booleans(), 'stop': st.lists(st.text(min_size=1, max_size=3),
                                                                                     max_size=2)})
VALID_INPUTS = st.one_of(
    st.fixed_dictionaries({'input_ids': st.lists(st.integers(0, 900), min_size=1, max_size=8)}),
    st.fixed_dictionaries({'messages': st.lists(st.fixed_dictionaries({'role': st.just('user'),
                                                                       'content': st.text(max_size=12)}),
                                                min_size=1, max_size=2)}))
REQUESTS = st.one_of(st.tuples(st.just(True), VALID_INPUTS, VALID_PARAMS), st.tuples(st.just(False), INPUTS, PARAMS))
OUTCOMES: dict[str, dict[str, int]] = {}


@pytest.fixture(scope='module', params=ENGINES)
def blocking(request, tiny_model_dir):
    facade = {'torch': TorchSampler, 'vllm': vLLMSampler}[request.param]
    sampler = facade(model_id=str(tiny_model_dir), engine_args={'max_model_len': 256, 'max_num_seqs': 8})
    yield sampler
    sampler.close()


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
def test_fuzzed_requests_raise_only_our_errors_and_never_kill_the_engine(blocking, request):
    valid, item, params = request
    if isinstance(params.get('max_tokens'), int) and params['max_tokens'] > 0 or 'max_tokens' not in params:
        params = {**params, 'max_tokens': min(params.get('max_tokens', 4), 6)}
    counts = OUTCOMES.setdefault(blocking.engine_kind, {'valid': 0, 'succeeded': 0, 'refused': 0})
    counts['valid'] += valid
    try:
        response = blocking.sample(item, params)
    except TwinkleAsyncError:
        assert not valid, f'a valid request failed: {item!r} {params!r}'
        counts['refused'] += 1
    else:
        assert isinstance(response, SampleResponse)
        counts['succeeded'] += 1
        if valid:
            assert len(response.sequences) == params.get('num_samples', 1)
            assert all(0 < len(s.tokens) <= params['max_tokens'] for s in response.sequences)


def test_the_fuzz_ran_valid_and_refused_requests(blocking):
    counts = OUTCOMES[blocking.engine_kind]
    print(f'{blocking.engine_kind}: {counts}')
    assert counts['valid'] >= 15 and counts['succeeded'] >= counts['valid'] and counts['refused'] >= 15
    assert not blocking.async_sampler.engine.is_dead
