"""Tool calls: a completion holding Hermes/Qwen ``<tool_call>`` JSON becomes OpenAI ``tool_calls`` (as the real
``openai`` client parses them), and a conversation carrying calls and results reaches the model's chat template."""

from __future__ import annotations

import json

import pytest
from openai.types.chat import ChatCompletion
from transformers import AutoTokenizer

from twinkle_async.data_format.outputs import SampledSequence, SampleResponse
from twinkle_async.serve import openai_format as fmt
from twinkle_async.template import Template

TOOL_TEXT = 'Let me add.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS={{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
    "{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ADD_TOOL = {'type': 'function', 'function': {'name': 'add', 'parameters': {'type': 'object', 'properties': {
    'a': {'type': 'number'}, 'b': {'type': 'number'}}}}}


def test_a_tool_call_in_the_output_is_an_openai_tool_call(tiny_model_dir):
    template = Template(str(tiny_model_dir))

    response = SampleResponse(sequences=[SampledSequence(stop_reason='stop', tokens=[1, 2], decoded=TOOL_TEXT)],
                              prompt_token_ids=[5, 6, 7])
    body = fmt.chat_body(response, 'tiny', template.decode, template.split_tool_calls, with_token_ids=False)
    parsed = ChatCompletion.model_validate(body)  # what the openai client builds from the HTTP body
    choice = parsed.choices[0]
    assert choice.finish_reason == 'tool_calls' and choice.message.content == 'Let me add.'
    (call,) = choice.message.tool_calls
    assert call.type == 'function' and call.function.name == 'add' and call.id.startswith('call_')
    assert json.loads(call.function.arguments) == {'a': 1, 'b': 2}
    plain = fmt.chat_body(response, 'tiny', template.decode, None, with_token_ids=False)
    assert plain['choices'][0]['message'] == {'role': 'assistant', 'content': TOOL_TEXT}, 'no tools offered'


def test_the_calls_and_results_an_agent_sends_back_reach_the_chat_template(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = Template(tokenizer, chat_template=TOOL_TEMPLATE)
    call = {'id': 'call_1', 'type': 'function', 'function': {'name': 'add', 'arguments': '{"a": 1, "b": 2}'}}
    messages = [{'role': 'user', 'content': '1+2?'}, {'role': 'assistant', 'content': None, 'tool_calls': [call]},
                {'role': 'tool', 'tool_call_id': 'call_1', 'content': '3'}]
    ids = template.encode({'messages': messages, 'tools': [ADD_TOOL]})['input_ids']
    assert template.decode(ids, skip_special_tokens=False) == (
        'TOOLS=add\n<user>1+2?</user>\n<assistant>[call add {"a": 1, "b": 2}]</assistant>\n'
        '<tool>3[for call_1]</tool>\n<assistant>')


def test_a_stream_holds_back_only_what_may_open_a_tool_call():
    starts = ['<tool_call>']
    assert fmt.shown_before_calls('Let me add.', starts) == 'Let me add.'
    assert fmt.shown_before_calls('Let me add.<tool', starts) == 'Let me add.', 'maybe a call: held'
    assert fmt.shown_before_calls('Let me add.<tool_call>{"na', starts) == 'Let me add.'
    assert fmt.shown_before_calls('a < b', starts) == 'a < b' and fmt.shown_before_calls('a <', starts) == 'a '


def streamed_calls(text: str) -> tuple[list[dict], list[dict]]:
    """``text`` fed one character at a time: the calls as a client accumulates the deltas, and the deltas."""
    calls: dict[int, dict] = {}
    deltas = fmt.ToolCallDeltas()
    updates = [deltas.update(text[:end]) for end in range(1, len(text))] + [deltas.update(text, final=True)]
    for delta in (d for update in updates for d in update):
        assert ('id' in delta) == (delta['index'] not in calls), 'a call is announced once, by its first delta'
        if 'id' in delta:
            calls[delta['index']] = {'id': delta['id'], 'name': delta['function']['name'], 'arguments': ''}
        calls[delta['index']]['arguments'] += delta['function']['arguments']
    return [calls[i] for i in sorted(calls)], [d for update in updates for d in update]


@pytest.mark.parametrize('text, fragments', [
    (TOOL_TEXT, 13),  # JSON written name first: the arguments stream as the model writes them
    ('<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>', 7),
    ('<tool_call>\n{"name": "f", "arguments": {"x": {"y": [1, 2]}, "s": "}"}}\n</tool_call>', None),
    ('<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>', 1),  # whole, once closed
    ('<tool_call>\n<function=add>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n</parameter>\n'
     '</function>\n</tool_call>', 1),
    ('Two.<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "neg", "arguments": '
     '{}}</tool_call>', None),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', None),  # cut off by max_tokens: still a call
    ('<tool_call>\nnot json\n</tool_call><tool_call>{"name": "ok", "arguments": {"v": "<tool"}}</tool_call>', None),
])
def test_streamed_tool_call_deltas_add_up_to_the_parsed_calls(tiny_model_dir, text, fragments):
    calls, deltas = streamed_calls(text)
    message, _ = fmt.chat_message(text, Template(str(tiny_model_dir)).split_tool_calls)
    expected = message.get('tool_calls') or []
    assert [c['name'] for c in calls] == [c['function']['name'] for c in expected]
    assert [json.loads(c['arguments']) for c in calls] == [json.loads(c['function']['arguments']) for c in expected]
    assert all(c['id'].startswith('call_') for c in calls)
    if fragments is not None:  # fed a character at a time
        assert len([d for d in deltas if d['function']['arguments']]) == fragments


def test_an_unclosed_call_holds_back_what_may_close_it():
    """Spaces, braces and a partial ``</tool_call>`` at the end may belong to the call's end, not its arguments."""
    deltas = fmt.ToolCallDeltas()
    assert deltas.update('<tool_call>{"name": "add", "arguments": {"a": {"b": 1}}}\n</tool_')[0]['function'] == {
        'name': 'add', 'arguments': '{"a": {"b": 1'}
    assert deltas.update('<tool_call>{"name": "add", "arguments": {"a": {"b": 1}}}\n</tool_call>') == [
        {'index': 0, 'function': {'arguments': '}}'}}]
