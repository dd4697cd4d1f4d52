"""A tool-call round trip on a model that makes calls: the tiny model trained (in a fixture, ~1 s) to answer
"What is 1 + 2?" with an ``add`` call and the tool's result with the sum, under a Qwen2.5-shaped tools template.
Served on both engines, driven by the real ``openai`` client, streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_asyncio

from .conftest import serving
from conftest import ENGINES, within
from tiny_model import build_tool_model

ADD_TOOL = {'type': 'function', 'function': {'name': 'add', 'description': 'a + b', 'parameters': {
    'type': 'object', 'properties': {'a': {'type': 'number'}, 'b': {'type': 'number'}}}}}
QUESTION = [{'role': 'user', 'content': 'What is 1 + 2?'}]
CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
ANSWER = 'The sum is 3.'
GREEDY = {'temperature': 0, 'max_tokens': 80}


def with_result(call_id: str, arguments: str) -> list[dict]:
    """The conversation after the agent ran the call: the assistant's call, then the tool's result."""
    call = {'id': call_id, 'type': 'function', 'function': {'name': 'add', 'arguments': arguments}}
    return [*QUESTION, {'role': 'assistant', 'content': None, 'tool_calls': [call]},
            {'role': 'tool', 'tool_call_id': call_id, 'content': str(sum(json.loads(arguments).values()))}]


@pytest.fixture(scope='module')
def tool_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lessons = [({'messages': QUESTION, 'tools': [ADD_TOOL]}, CALL_TEXT),
               ({'messages': with_result('call_0', '{"a": 1, "b": 2}'), 'tools': [ADD_TOOL]}, ANSWER)]
    return build_tool_model(tiny_model_dir, tmp_path_factory.mktemp('tool-model'), lessons)


@pytest_asyncio.fixture(scope='module', params=ENGINES)
async def tool_served(request: pytest.FixtureRequest, tool_model_dir: Path):
    from twinkle_async import AsyncSampler
    engine_args = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': 4,
                   **({'kv_cache_memory_bytes': 64 * 2**20} if request.param == 'vllm' else {})}
    async with AsyncSampler(str(tool_model_dir), engine=request.param, engine_args=engine_args) as sampler:
        async with serving(sampler) as served:
            yield served


async def test_the_agent_calls_the_tool_sends_the_result_and_gets_the_answer(tool_served):
    client = tool_served.client()
    reply = await within(client.chat.completions.create(model='tiny', messages=QUESTION, tools=[ADD_TOOL], **GREEDY))
    choice = reply.choices[0]
    assert choice.finish_reason == 'tool_calls' and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == 'add' and json.loads(call.function.arguments) == {'a': 1, 'b': 2}

    messages = [*QUESTION, choice.message.model_dump(exclude_none=True),
                {'role': 'tool', 'tool_call_id': call.id, 'content': '3'}]
    answer = await within(client.chat.completions.create(model='tiny', messages=messages, tools=[ADD_TOOL],
                                                         extra_body={'return_token_ids': True}, **GREEDY))
    assert answer.choices[0].message.content == ANSWER and answer.choices[0].finish_reason == 'stop'
    template = tool_served.sampler.template
    rendered = template.encode({'messages': with_result(call.id, call.function.arguments), 'tools': [ADD_TOOL]})
    assert answer.model_extra['prompt_token_ids'] == list(rendered['input_ids']), 'the call and result reached it'
    assert '<tool_response>\n3\n</tool_response>' in template.decode(answer.model_extra['prompt_token_ids'])


async def test_a_streamed_call_arrives_as_openai_streams_it(tool_served):
    client = tool_served.client()
    whole = await within(client.chat.completions.create(model='tiny', messages=QUESTION, tools=[ADD_TOOL], **GREEDY))
    stream = await within(client.chat.completions.create(model='tiny', messages=QUESTION, tools=[ADD_TOOL],
                                                         stream=True, **GREEDY))
    chunks = [chunk async for chunk in stream]
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == 'add' and deltas[0].type == 'function'
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    fragments = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(fragments) >= 3, f'the arguments arrive as the model writes them: {fragments}'
    assert ''.join(fragments) == whole.choices[0].message.tool_calls[0].function.arguments
    assert not any(chunk.choices[0].delta.content for chunk in chunks), 'no call markup leaks into the content'
    assert chunks[-1].choices[0].finish_reason == 'tool_calls'

    async with client.chat.completions.stream(model='tiny', messages=QUESTION, tools=[ADD_TOOL], **GREEDY) as events:
        accumulated = await within(events.get_final_completion())  # the openai client's own accumulation
    (call,) = accumulated.choices[0].message.tool_calls
    assert call.function.name == 'add' and json.loads(call.function.arguments) == {'a': 1, 'b': 2}
    assert accumulated.choices[0].finish_reason == 'tool_calls'
