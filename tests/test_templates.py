"""Templates in Twinkle's forms: names and arguments, OpenAI-shaped tools, truncation, continuation features."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
from transformers import AutoTokenizer

from twinkle_async.errors import ConfigurationError, InvalidInputError, PromptTooLongError, TemplateNotFoundError
from twinkle_async.template import TEMPLATES, HermesParser, Qwen3_5Template, Template, build_template

# A chat template that renders everything Hugging Face's tool-calling convention hands it, so a test can see
# what reached it: tools, tool_calls (arguments as a dict), tool_call_id, reasoning_content and variables.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.reasoning_content %}[think:{{ m.reasoning_content }}]{% endif %}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}"
    "[no-think]{% endif %}{{ flavour | default('') }}{% endif %}"
)
TOOLS_OPENAI = [{'type': 'function', 'function': {
    'name': 'play', 'description': 'Take an action.',
    'parameters': {'type': 'object', 'properties': {'action': {'type': 'string', 'enum': ['hit', 'stand']}}}}}]


@pytest.fixture(scope='module')
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rendered(template: Template, trajectory: dict, **kwargs) -> str:
    return template.decode(template.encode(trajectory, **kwargs)['input_ids'], skip_special_tokens=False)


def test_every_name_builds_and_family_names_use_the_models_own_chat_template(tokenizer):
    chat = {'messages': [{'role': 'user', 'content': 'hi'}]}
    own = tokenizer.apply_chat_template(chat['messages'], tokenize=False, add_generation_prompt=True)
    for name in TEMPLATES:
        assert build_template(name, tokenizer).encode(chat)['input_ids']
    for name in ('Template', 'default', 'Qwen3_5Template', 'DeepseekV4Template'):
        assert rendered(build_template(name, tokenizer), chat) == own
    with pytest.raises(TemplateNotFoundError, match=r"Qwen3_5Template.*chatml|chatml.*Qwen3_5Template"):
        build_template('Llama99Template', tokenizer)


def test_chatml_renders_chatml_whatever_template_the_tokenizer_ships(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = TOOL_TEMPLATE
    chat = {'messages': [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'hi'}]}
    assert rendered(build_template('default', other), chat) == '<system>S</system>\n<user>hi</user>\n<assistant>'
    assert rendered(build_template('chatml', other), chat) == \
        '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'


def test_a_template_is_built_from_a_model_id_as_twinkle_does(tiny_model_dir, tokenizer):
    template = Qwen3_5Template(str(tiny_model_dir), max_length=64, enable_thinking=False)
    template.truncation_strategy = 'delete'
    assert template.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert template.encode({'messages': [{'role': 'user', 'content': 'x ' * 100}]}) is None
    assert template.processor is template.tokenizer


def test_enable_thinking_and_other_variables_reach_the_chat_template(tokenizer):
    chat = {'messages': [{'role': 'user', 'content': 'q'}]}
    quiet = build_template('Template', tokenizer, chat_template=TOOL_TEMPLATE, enable_thinking=False, flavour='!')
    assert rendered(quiet, chat).endswith('<assistant>[no-think]!')
    loud = build_template('Template', tokenizer, chat_template=TOOL_TEMPLATE)
    assert rendered(loud, chat).endswith('<assistant>')


def test_default_system_is_inserted_before_a_leading_user_message_only(tokenizer):
    template = build_template('Template', tokenizer, default_system='Be brief.')
    user_first = {'messages': [{'role': 'user', 'content': 'q'}]}
    assert rendered(template, user_first).startswith('<|im_start|>system\nBe brief.<|im_end|>')
    assert template.encode(user_first)['messages'][0] == {'role': 'system', 'content': 'Be brief.'}
    assert user_first == {'messages': [{'role': 'user', 'content': 'q'}]}, 'the input is not modified'
    system_first = {'messages': [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'q'}]}
    assert 'Be brief.' not in rendered(template, system_first)


def test_truncation_strategies_apply_to_prompts_as_twinkle_defines_them(tokenizer):
    chat = {'messages': [{'role': 'user', 'content': 'def f(x): return x + 1\n' * 20}]}
    full = build_template('Template', tokenizer, max_length=None).encode(chat)['input_ids']
    assert len(full) > 40
    left = build_template('Template', tokenizer, max_length=40, truncation_strategy='left').encode(chat)
    right = build_template('Template', tokenizer, max_length=40, truncation_strategy='right').encode(chat)
    assert left['input_ids'] == full[-40:] and right['input_ids'] == full[:40]
    assert left['length'] == 40 and left['attention_mask'] == [1] * 40 and left['position_ids'] == list(range(40))
    assert build_template('Template', tokenizer, max_length=40, truncation_strategy='delete').encode(chat) is None
    with pytest.raises(PromptTooLongError, match='max_length=40'):
        build_template('Template', tokenizer, max_length=40, truncation_strategy='raise').encode(chat)
    with pytest.raises(ConfigurationError, match='split'):
        build_template('Template', tokenizer, truncation_strategy='split')


def test_use_chat_template_false_tokenizes_one_user_message_as_is(tokenizer):
    template = build_template('Template', tokenizer, use_chat_template=False)
    assert template.encode({'messages': [{'role': 'user', 'content': 'x = 1'}]})['input_ids'] == \
        tokenizer.encode('x = 1')
    with pytest.raises(InvalidInputError, match='one user message'):
        template.encode({'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'q'}]})


def openai_conversation(arguments) -> dict:
    return {'tools': TOOLS_OPENAI, 'messages': [
        {'role': 'system', 'content': 'Play.'},
        {'role': 'user', 'content': 'Hand 13.'},
        {'role': 'assistant', 'content': '', 'reasoning_content': 'low hand',
         'tool_calls': [{'id': 'call_7', 'type': 'function', 'function': {'name': 'play', 'arguments': arguments}}]},
        {'role': 'tool', 'content': 'Hand 20.', 'tool_call_id': 'call_7'},
        {'role': 'user', 'content': 'Next?'}]}


@pytest.mark.parametrize('arguments', [{'action': 'hit'}, '{"action": "hit"}'])
def test_openai_tools_tool_calls_and_tool_results_reach_the_template_as_hugging_face_expects(tokenizer, arguments):
    template = build_template('Template', tokenizer, chat_template=TOOL_TEMPLATE)
    conversation = openai_conversation(arguments)
    reference = copy.deepcopy(openai_conversation({'action': 'hit'}))  # HF wants arguments as a dict
    expected = tokenizer.apply_chat_template(reference['messages'], tools=reference['tools'],
                                             chat_template=TOOL_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert rendered(template, conversation) == expected
    assert '[call call_7 play {"action": "hit"}]' in expected and '[for call_7]' in expected
    assert '[think:low hand]' in expected and '"enum": ["hit", "stand"]' in expected


def test_twinkles_older_tool_shape_renders_like_the_openai_one(tokenizer):
    template = build_template('Template', tokenizer, chat_template=TOOL_TEMPLATE)
    legacy = openai_conversation({'action': 'hit'})
    legacy['tools'] = [{'tool_name': 'play', 'description': 'Take an action.',
                        'parameters': json.dumps(TOOLS_OPENAI[0]['function']['parameters'])}]
    legacy['messages'][2]['tool_calls'] = [{'tool_name': 'play', 'arguments': '{"action": "hit"}'}]
    ids = template.encode(legacy)['input_ids']
    assert template.decode(ids, skip_special_tokens=False) == \
        rendered(template, openai_conversation({'action': 'hit'})).replace('[call call_7 ', '[call  ')
    with pytest.raises(InvalidInputError, match=r'tool_calls\[0\].arguments is not JSON'):
        bad = openai_conversation('{"action": ')
        template.encode(bad)


def test_hermes_parser_reads_json_and_xml_calls_and_skips_broken_ones():
    text = ('thinking <tool_call>{"name": "play", "arguments": {"action": "hit"}}</tool_call>'
            '<tool_call>{"name": "broken"</tool_call>'
            '<tool_call><function=search><parameter=q>cats</parameter><parameter=n>3</parameter></function>'
            '</tool_call>')
    parser = HermesParser()
    assert parser.detect(text) and parser.clean(text) == 'thinking'
    assert parser.parse(text) == [
        {'type': 'function', 'function': {'name': 'play', 'arguments': {'action': 'hit'}}},
        {'type': 'function', 'function': {'name': 'search', 'arguments': {'q': 'cats', 'n': 3}}}]


def test_concat_input_feature_is_twinkles_continuation_with_parsed_tool_calls(default_model_dir):
    template = Template(str(default_model_dir))
    trajectory = {'messages': [{'role': 'user', 'content': 'Act.'}], 'tools': TOOLS_OPENAI,
                  'user_data': [('episode', '3')], 'custom': np.arange(3)}
    prompt = template.encode(trajectory)
    prompt['labels'] = np.array(prompt['labels'])  # as Twinkle's encode leaves them: arrays
    frozen = pickle.dumps(prompt)
    completion_text = 'Sure. <tool_call>{"name": "play", "arguments": {"action": "stand"}}</tool_call>'
    completion = template.tokenizer(completion_text, add_special_tokens=False)['input_ids'] + \
        [template.tokenizer.eos_token_id]
    result = template.concat_input_feature(prompt, completion)
    n, p = len(prompt['input_ids']) + len(completion), len(prompt['input_ids'])
    assert result['input_ids'] == prompt['input_ids'] + completion
    # labels rolled by one as Twinkle stores them: position i holds the target of i (the next token)
    assert result['labels'] == [-100] * (p - 1) + completion + [-100]
    assert (result['attention_mask'], result['position_ids'], result['length']) == ([1] * n, list(range(n)), n)
    assert result['tools'] == TOOLS_OPENAI and result['user_data'] == [('episode', '3')]
    assert result['custom'] == [0, 1, 2]
    assert result['messages'][-1] == {'role': 'assistant', 'content': 'Sure.', 'tool_calls': [
        {'type': 'function', 'function': {'name': 'play', 'arguments': {'action': 'stand'}}, 'id': 'call_0'}]}
    assert pickle.dumps(prompt) == frozen, 'the prompt feature is not modified'
    plain = template.concat_input_feature(prompt, template.tokenizer('Hello there', add_special_tokens=False)
                                          ['input_ids'])
    assert plain['messages'][-1] == {'role': 'assistant', 'content': 'Hello there'}


def test_labels_that_do_not_match_the_ids_are_refused(default_model_dir):
    template = Template(str(default_model_dir))
    with pytest.raises(InvalidInputError, match='labels has 2 entries but input_ids has 3'):
        template.concat_input_feature({'input_ids': [1, 2, 3], 'labels': [1, 2]}, [4])
