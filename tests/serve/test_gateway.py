"""The gateway through the real ``openai`` client against a real uvicorn server, on both engines: each answer is
compared with the in-process sampler's (itself checked against HF generate elsewhere)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from .conftest import API_KEY
from conftest import counters_when, within

GREEDY = {'temperature': 0, 'max_tokens': 12}
CHAT = [{'role': 'user', 'content': 'def add(a, b):'}]


async def in_process(served, messages, **params):
    return await within(served.sampler.sample({'messages': messages}, params))


async def test_chat_equals_in_process_sampling_with_token_ids_and_usage(served):
    reply = await within(served.client().chat.completions.create(
        model='tiny', messages=CHAT, extra_body={'return_token_ids': True, 'ignore_eos': True}, **GREEDY))
    expected = await in_process(served, CHAT, ignore_eos=True, **GREEDY)
    choice = reply.choices[0]
    assert choice.message.role == 'assistant' and choice.message.content == expected.sequences[0].decoded
    assert choice.finish_reason == 'length'
    extra = reply.model_extra
    assert extra['prompt_token_ids'] == expected.prompt_token_ids
    assert choice.model_extra['token_ids'] == expected.sequences[0].tokens
    assert choice.model_extra['weight_versions'] == [served.sampler.weight_version] * 12
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)


async def test_streamed_chunks_concatenate_to_the_non_streamed_text(served):
    client = served.client()
    whole = await within(client.chat.completions.create(model='tiny', messages=CHAT, **GREEDY))
    stream = await within(client.chat.completions.create(model='tiny', messages=CHAT, stream=True,
                                                         stream_options={'include_usage': True}, **GREEDY))
    chunks = [chunk async for chunk in stream]
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_n_and_logprobs_equal_the_samplers(served):
    params = {'temperature': 0.8, 'max_tokens': 6, 'seed': 5}
    reply = await within(served.client().chat.completions.create(model='tiny', messages=CHAT, n=2, logprobs=True,
                                                                 top_logprobs=2, **params))
    expected = await in_process(served, CHAT, num_samples=2, logprobs=2, **params)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, sequence in zip(reply.choices, expected.sequences):
        assert choice.message.content == sequence.decoded
        content = choice.logprobs.content
        assert [entry.logprob for entry in content] == [row[0][1] for row in sequence.logprobs]
        assert [[alt.logprob for alt in entry.top_logprobs] for entry in content] == \
            [[lp for _, lp in row[1:]] for row in sequence.logprobs]


async def test_completions_take_text_or_token_ids(served):
    client = served.client()
    ids = served.sampler.template.tokenizer('def f(x):', add_special_tokens=False)['input_ids']
    by_text = await within(client.completions.create(model='tiny', prompt='def f(x):', **GREEDY))
    by_ids = await within(client.completions.create(model='tiny', prompt=ids, **GREEDY))
    expected = (await within(served.sampler.sample({'input_ids': ids}, GREEDY))).sequences[0]
    assert by_text.choices[0].text == by_ids.choices[0].text == expected.decoded
    streamed = await within(client.completions.create(model='tiny', prompt=ids, stream=True, **GREEDY))
    assert ''.join([c.choices[0].text async for c in streamed]) == expected.decoded


async def test_max_tokens_past_the_context_is_cut_to_the_room_left_as_vllm_serve_does(served):
    context = served.sampler.engine.max_model_len
    prompt = list(range(10, 30))
    reply = await within(served.client().completions.create(model='tiny', prompt=prompt, max_tokens=context,
                                                            temperature=0, extra_body={'ignore_eos': True}), 120)
    assert reply.usage.completion_tokens == context - len(prompt) and reply.choices[0].finish_reason == 'length'


async def test_models_list_adapters_and_model_selects_one(served, lora_dirs):
    sampler = served.sampler
    await within(sampler.add_adapter('a', lora_dirs['a']))
    try:
        client = served.client()
        assert [m.id for m in (await within(client.models.list())).data] == ['tiny', 'a']
        reply = await within(client.chat.completions.create(model='a', messages=CHAT, **GREEDY))
        expected = await within(sampler.sample({'messages': CHAT}, GREEDY, adapter_name='a'))
        base = await in_process(served, CHAT, **GREEDY)
        assert reply.choices[0].message.content == expected.sequences[0].decoded != base.sequences[0].decoded
    finally:
        await within(sampler.remove_adapter('a'))


async def test_a_three_turn_session_exports_exactly_what_the_engine_was_given_and_sampled(served):
    client = served.client(default_headers={'X-Session-ID': 'agent-1'})
    messages, turns = [{'role': 'user', 'content': 'first'}], []
    for text in ('second', 'third', None):
        reply = await within(client.chat.completions.create(
            model='tiny', messages=messages, logprobs=True, extra_body={'return_token_ids': True}, **GREEDY))
        choice = reply.choices[0]
        turns.append((reply.model_extra['prompt_token_ids'], choice.model_extra['token_ids'],
                      [e.logprob for e in choice.logprobs.content]))
        messages += [{'role': 'assistant', 'content': choice.message.content}]
        if text:
            messages += [{'role': 'user', 'content': text}]
    async with httpx.AsyncClient(base_url=served.base_url, headers={'Authorization': f'Bearer {API_KEY}'}) as http:
        trajectory = (await within(http.get('/sessions/agent-1/trajectory'))).json()
        assert trajectory['restarts'] == 0 and len(trajectory['segments']) == 1
        segment = trajectory['segments'][0]
        last_prompt, last_tokens, _ = turns[-1]
        assert segment['token_ids'] == last_prompt + last_tokens, 'token for token what the engine saw'
        mask, logprobs = [0] * len(segment['token_ids']), [None] * len(segment['token_ids'])
        for prompt, tokens, turn_logprobs in turns:
            assert segment['token_ids'][:len(prompt) + len(tokens)] == prompt + tokens, 'each turn extends the last'
            mask[len(prompt):len(prompt) + len(tokens)] = [1] * len(tokens)
            logprobs[len(prompt):len(prompt) + len(tokens)] = turn_logprobs
        assert segment['loss_mask'] == mask and segment['logprobs'] == logprobs
        assert len(segment['finish_reasons']) == 3
        assert (await within(http.delete('/sessions/agent-1/trajectory'))).status_code == 200
        assert (await within(http.get('/sessions/agent-1/trajectory'))).status_code == 404


def first_token(line: str) -> bool:
    """An SSE line carrying generated text (the role chunk before it carries none)."""
    return line.startswith('data: {') and bool(json.loads(line[6:])['choices'][0]['delta'].get('content'))


async def test_a_client_that_disconnects_mid_stream_aborts_its_request(served):
    engine = served.sampler.engine
    aborted_before = (await within(engine.stats())).aborted
    body = {'model': 'tiny', 'messages': CHAT, 'max_tokens': 400, 'ignore_eos': True, 'stream': True}
    async with httpx.AsyncClient(base_url=served.base_url, headers={'Authorization': f'Bearer {API_KEY}'}) as http:
        async with http.stream('POST', '/chat/completions', json=body) as response:
            lines = response.aiter_lines()
            while not first_token(await within(anext(lines))):
                pass
    stats = await within(counters_when(served.sampler, lambda s: s.aborted > aborted_before and s.running == 0))
    assert (stats.aborted - aborted_before, stats.waiting, stats.used_slots) == (1, 0, 0)


MALFORMED = [
    ('{not json', 400, 'invalid_json'), ('[1, 2]', 400, 'invalid_json'), ('{}', 422, None),
    ('{"messages": []}', 422, None), ('{"messages": "hi"}', 422, None),
    ('{"messages": [{"role": "robot", "content": "x"}]}', 400, None),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 422, None),
    ('{"messages": [{"role": "user", "content": "x"}], "n": 0}', 422, None),
    ('{"messages": [{"role": "user", "content": "%s"}]}' % ('word ' * 2000), 413, 'context_length_exceeded'),
    ('{"messages": [{"role": "user", "content": "x"}], "model": "ghost"}', 404, 'model_not_found'),
]


async def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(served):
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        assert (await within(http.get('/models'))).status_code == 401, 'no key'
        http.headers['Authorization'] = f'Bearer {API_KEY}'
        for _ in range(5):
            for body, status, code in MALFORMED:
                response = await within(http.post('/chat/completions', content=body,
                                                  headers={'content-type': 'application/json'}))
                assert response.status_code == status, (body, response.text)
                error = response.json()['error']
                assert set(error) == {'message', 'type', 'param', 'code'} and error['message']
                assert code is None or error['code'] == code
        too_big = await within(http.post('/chat/completions', content=b'x' * (9 * 2**20)))
        assert too_big.status_code == 413
    reply = await within(served.client().chat.completions.create(model='tiny', messages=CHAT, **GREEDY))
    assert reply.choices[0].message.content == (await in_process(served, CHAT, **GREEDY)).sequences[0].decoded


async def test_openai_client_raises_its_typed_errors(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError):
        await within(client.chat.completions.create(model='ghost', messages=CHAT))
    with pytest.raises(openai.AuthenticationError):
        await within(served.client(api_key='wrong').chat.completions.create(model='tiny', messages=CHAT))


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name value`` (labels included in ``name``) of a Prometheus scrape."""
    return next((float(line.rsplit(' ', 1)[1]) for line in text.splitlines() if line.startswith(name + ' ')), 0.0)


async def test_metrics_count_requests_and_tokens_and_show_the_weight_version(served):
    async with httpx.AsyncClient(base_url=served.base_url.removesuffix('/v1'),
                                 headers={'Authorization': f'Bearer {API_KEY}'}) as http:
        before = (await within(http.get('/metrics'))).text
        await within(served.client().chat.completions.create(model='tiny', messages=CHAT,
                                                              extra_body={'ignore_eos': True}, **GREEDY))
        after = (await within(http.get('/metrics'))).text
    ok = 'twinkle_async_requests_total{endpoint="chat",status="200"}'
    assert metric(after, ok) - metric(before, ok) == 1
    assert metric(after, 'twinkle_async_completion_tokens_total') - \
        metric(before, 'twinkle_async_completion_tokens_total') == 12
    assert metric(after, 'twinkle_async_weight_version') == served.sampler.weight_version
    assert metric(after, 'twinkle_async_requests_in_flight') == 0
    assert 'twinkle_async_request_latency_seconds_bucket' in after and 'twinkle_async_kv_cache_usage' in after
    returned = 'twinkle_async_rollouts{counter="returned_tokens"}'  # the sampler's rollout counters, shared
    assert metric(after, returned) - metric(before, returned) == 12
    assert metric(after, 'twinkle_async_rollouts{counter="max_staleness_returned"}') == \
        served.sampler.metrics()['max_staleness_returned']  # the session's sampler: other tests update it too


async def test_a_per_session_base_url_groups_calls_like_the_header(served):
    root = served.base_url.removesuffix('/v1')
    client = served.client(base_url=f'{root}/sessions/by-url/v1')
    reply = await within(client.chat.completions.create(model='tiny', messages=CHAT,
                                                        extra_body={'return_token_ids': True}, **GREEDY))
    async with httpx.AsyncClient(base_url=served.base_url, headers={'Authorization': f'Bearer {API_KEY}'}) as http:
        (segment,) = (await within(http.get('/sessions/by-url/trajectory'))).json()['segments']
    assert segment['token_ids'] == reply.model_extra['prompt_token_ids'] + reply.choices[0].model_extra['token_ids']


async def test_with_tools_offered_a_stream_still_streams_text_that_holds_no_call(served):
    tool = {'type': 'function', 'function': {'name': 'noop', 'parameters': {'type': 'object', 'properties': {}}}}
    client = served.client()
    whole = await within(client.chat.completions.create(model='tiny', messages=CHAT, tools=[tool], **GREEDY))
    stream = await within(client.chat.completions.create(model='tiny', messages=CHAT, tools=[tool], stream=True,
                                                         **GREEDY))
    pieces = [c.choices[0].delta.content for c in [chunk async for chunk in stream] if c.choices]
    assert ''.join(p or '' for p in pieces) == whole.choices[0].message.content
    assert whole.choices[0].message.tool_calls is None
    assert sum(1 for p in pieces if p) > 1, 'sent as it was generated, not all at the end'


async def test_requests_over_the_admission_bound_get_429(served):
    sampler, client = served.sampler, served.client()
    sampler.admission.max_pending = 1
    await within(sampler.pause('abort'))
    try:
        held = asyncio.create_task(client.chat.completions.create(model='tiny', messages=CHAT, **GREEDY))
        await within(counters_when(sampler, lambda s: s.waiting == 1))
        with pytest.raises(openai.RateLimitError, match='max_pending_requests=1'):
            await within(client.chat.completions.create(model='tiny', messages=CHAT, **GREEDY))
    finally:
        sampler.admission.max_pending = None
        await within(sampler.resume())
    expected = (await in_process(served, CHAT, **GREEDY)).sequences[0].decoded
    assert (await within(held)).choices[0].message.content == expected
