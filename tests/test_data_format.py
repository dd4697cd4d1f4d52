"""SamplingParams, templates, request/response building: pure code, no model."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from twinkle_async import SamplingParams
from twinkle_async.engines.base import EngineOutput
from twinkle_async.errors import InvalidInputError, InvalidSamplingParamsError, PromptTooLongError
from twinkle_async.sampler.requests import coerce_params, encode_input, resolve_params
from twinkle_async.sampler.responses import ResponseBuilder
from twinkle_async.template import IncrementalDetokenizer, Template, build_template


def test_from_dict_accepts_max_new_tokens_and_rejects_unknown_keys():
    assert SamplingParams.from_dict({'max_new_tokens': 7}).max_tokens == 7
    with pytest.raises(InvalidSamplingParamsError, match='bogus'):
        SamplingParams.from_dict({'bogus': 1})
    with pytest.raises(InvalidSamplingParamsError, match='not both'):
        SamplingParams.from_dict({'max_new_tokens': 7, 'max_tokens': 3})


@pytest.mark.parametrize('field,value', [('temperature', -1), ('top_p', 0), ('top_p', 1.5), ('top_k', 0),
                                         ('repetition_penalty', 0), ('logprobs', -1), ('num_samples', 0),
                                         ('max_tokens', -1), ('stop', ''), ('stop', ['a', ''])])
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**{field: value})


def test_stop_is_split_into_strings_and_ids():
    assert SamplingParams(stop='</a>').stop_strings == ('</a>',)
    assert SamplingParams(stop=['x', 'yz']).stop_strings == ('x', 'yz')
    assert SamplingParams(stop=[3, 4]).stop_token_ids == (3, 4)


def test_num_samples_keyword_overrides_params():
    assert coerce_params({'num_samples': 2}, 5).num_samples == 5
    assert coerce_params(None).num_samples == 1


def test_resolve_params_fills_max_tokens_and_rejects_long_prompts():
    params = SamplingParams(max_tokens=100)
    assert resolve_params(params, 10, 64, 1000).max_tokens == 54
    assert resolve_params(SamplingParams(), 10, 64, 1000).max_tokens == 54
    with pytest.raises(PromptTooLongError, match='64'):
        resolve_params(params, 64, 64, 1000)


@pytest.fixture(scope='module')
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_template_encodes_chat_with_generation_prompt_and_tools(tokenizer):
    template = Template(tokenizer)
    ids = template.encode({'messages': [{'role': 'user', 'content': 'hi'}]})['input_ids']
    assert template.decode(ids, skip_special_tokens=False).endswith('<|im_start|>assistant\n')
    with pytest.raises(InvalidInputError, match='parameters'):
        template.encode({'messages': [{'role': 'user', 'content': 'hi'}],
                         'tools': [{'tool_name': 'calc', 'parameters': 'not json'}]})
    with pytest.raises(InvalidInputError, match='tool_name'):
        template.encode({'messages': [{'role': 'user', 'content': 'hi'}], 'tools': [{'description': 'x'}]})


def test_prompt_token_ids_accepts_features_tensors_and_trajectories(tokenizer):
    import torch
    template = build_template('chatml', tokenizer)
    assert encode_input({'input_ids': torch.tensor([1, 2, 3])}, template, 100)[1] == [1, 2, 3]
    assert encode_input({'input_ids': [[4, 5]]}, template, 100)[1] == [4, 5]
    chatml = tokenizer.encode('<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n', add_special_tokens=False)
    assert encode_input({'messages': [{'role': 'user', 'content': 'x'}]}, template, 10**6)[1] == chatml


def test_incremental_detokenizer_never_emits_a_broken_character(tokenizer):
    text = 'naïve café — 東京 🚀 done'
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.step(t) for t in ids]
    assert ''.join(deltas) == text
    assert all('\ufffd' not in d for d in deltas)
    assert sum(1 for d in deltas if d == '') > 0, 'some multi-byte characters span several tokens'


def test_response_builder_orders_samples_and_splits_prompt_logprobs():
    builder = ResponseBuilder([1, 2], num_samples=2, want_logprobs=True)
    builder.add(EngineOutput('r', 1, [9], [[(9, -0.5)]], 'b', 'length'))
    builder.add(EngineOutput('r', 0, [7], [[(7, -0.1), (7, -0.1)]], 'a', None,
                             prompt_logprobs=[None, [(2, -1.0), (3, -0.2)]]))
    builder.add(EngineOutput('r', 0, [8], [[(8, -0.2), (3, -0.1)]], 'c', 'stop'))
    response = builder.build(lambda tokens: {'input_ids': [1, 2] + tokens})
    assert [s.tokens for s in response.sequences] == [[7, 8], [9]]
    assert [s.decoded for s in response.sequences] == ['ac', 'b']
    assert response.prompt_logprobs == [None, -1.0] and response.topk_prompt_logprobs == [None, [(3, -0.2)]]
    assert response.sequences[0].new_input_feature['input_ids'] == [1, 2, 7, 8]


def test_incremental_detokenizer_window_stays_short_across_skipped_special_tokens(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    tokens = [eos] * 500 + tokenizer('abc def', add_special_tokens=False)['input_ids']
    text = ''.join(detokenizer.step(t) for t in tokens)
    assert text == 'abc def'
    assert len(detokenizer.token_ids) < 10, 'special tokens that decode to nothing still advance the window'
