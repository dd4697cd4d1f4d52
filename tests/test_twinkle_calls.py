"""Twinkle's call forms: num_samples on SamplingParams, adapter_path, sample_stream, shutdown, wake_up tags,
new_input_feature carrying every key, inputs never modified."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from twinkle_async import SamplingParams, TorchSampler
from twinkle_async.errors import EngineDeadError, InvalidAdapterError, InvalidRequestError

from conftest import chat, hf_greedy, load_hf, within


@pytest.fixture(scope='module')
def facade(tiny_model_dir):
    sampler = TorchSampler(model_id=str(tiny_model_dir), engine_args={'max_model_len': 256}, torch_dtype='float32')
    yield sampler
    sampler.close()


def test_num_samples_on_sampling_params_is_honoured_and_the_keyword_wins_when_given(facade):
    params = SamplingParams(max_tokens=3, num_samples=4, seed=2)
    assert len(facade.sample(chat('a'), params).sequences) == 4
    assert [len(r.sequences) for r in facade.sample([chat('a'), chat('b')], params)] == [4, 4]
    assert len(facade.sample(chat('a'), params, num_samples=2).sequences) == 2


def test_sample_stream_yields_text_and_finish_reason_pairs(facade):
    params = {'max_tokens': 12, 'temperature': 0, 'ignore_eos': True}
    pairs = list(facade.sample_stream(chat('x = '), params))
    assert all(isinstance(text, str) for text, _ in pairs)
    assert [reason for _, reason in pairs] == [None] * (len(pairs) - 1) + ['length']
    assert ''.join(text for text, _ in pairs) == facade.sample(chat('x = '), params).sequences[0].decoded


def test_shutdown_closes_and_the_template_is_public(tiny_model_dir):
    sampler = TorchSampler(model_id=str(tiny_model_dir), engine_args={'max_model_len': 128})
    ids = sampler.template.encode(chat('hi'))['input_ids']
    assert sampler.template.decode(ids, skip_special_tokens=False).startswith('<|im_start|>user')
    assert sampler.template.tokenizer.decode(ids, skip_special_tokens=True) == sampler.template.decode(ids)
    sampler.shutdown()
    sampler.shutdown()
    with pytest.raises(EngineDeadError, match='closed'):
        sampler.sample(chat('x'), {'max_tokens': 1})


async def test_adapter_path_loads_once_reloads_on_change_and_serves_the_peft_adapter(sampler, tiny_model_dir,
                                                                                       lora_dirs, tmp_path,
                                                                                       monkeypatch):
    adapter_dir = tmp_path / 'policy'
    shutil.copytree(lora_dirs['a'], adapter_dir)
    loads: list[str] = []
    real_add = sampler.add_adapter

    async def counting_add(name, source, tensors=None):
        loads.append(name)
        await real_add(name, source, tensors)

    monkeypatch.setattr(sampler, 'add_adapter', counting_add)
    prompt = sampler.template.encode(chat('def f(x):'))['input_ids']
    greedy = {'max_tokens': 8, 'temperature': 0, 'ignore_eos': True}
    first = await within(sampler.sample({'input_ids': prompt}, greedy, '', str(adapter_dir)))
    again = await within(sampler.sample({'input_ids': prompt}, greedy, adapter_path=str(adapter_dir)))
    assert len(loads) == 1, 'loaded once while its files stay the same'
    expected_a = hf_greedy(load_hf(tiny_model_dir, lora_dirs['a']), prompt, 8)
    assert first.sequences[0].tokens == again.sequences[0].tokens == expected_a
    for file in lora_dirs['a2'].iterdir():  # the trainer saved a new checkpoint into the same directory
        shutil.copy(file, adapter_dir / file.name)
    changed = await within(sampler.sample({'input_ids': prompt}, greedy, adapter_path=str(adapter_dir)))
    assert len(loads) == 2 and changed.sequences[0].tokens == hf_greedy(load_hf(tiny_model_dir, lora_dirs['a2']),
                                                                        prompt, 8)
    with pytest.raises(InvalidAdapterError, match='not a directory'):
        await within(sampler.sample(chat('x'), greedy, adapter_path=str(tmp_path / 'missing')))
    await within(sampler.remove_adapter(loads[0]))


async def test_wake_up_checks_twinkles_tags(sampler):
    with pytest.raises(InvalidRequestError, match='gpu'):
        await within(sampler.wake_up(tags=['gpu']))


def snapshot(value) -> bytes:
    return pickle.dumps(value)


async def test_inputs_are_never_modified_and_new_input_feature_carries_every_key(sampler):
    template = sampler.template
    encoded = template.encode({'messages': [{'role': 'user', 'content': 'def g():'}]})
    feature = {**encoded, 'input_ids': np.array(encoded['input_ids']), 'labels': np.array(encoded['labels']),
               'user_data': [('task', '"g"')], 'completion_mask': np.zeros(len(encoded['input_ids'])),
               'extra': {'k': [1]}}
    trajectory = {'messages': [{'role': 'system', 'content': 'Be short.'}, {'role': 'user', 'content': 'hello'}],
                  'tools': [{'type': 'function', 'function': {'name': 'f', 'parameters': {'type': 'object'}}}]}
    inputs = [feature, trajectory]
    before = snapshot(inputs)
    responses = await within(sampler.sample(inputs, {'max_tokens': 6, 'temperature': 0.9, 'seed': 1}, num_samples=2))
    assert snapshot(inputs) == before, 'the caller\'s inputs are left as they were'
    for source, response in zip(inputs, responses):
        for sequence in response.sequences:
            continued = sequence.new_input_feature
            assert continued['input_ids'] == response.prompt_token_ids + sequence.tokens
            assert set(source) <= set(continued) and continued['length'] == len(continued['input_ids'])
            reply = {'role': 'assistant', 'content': template.decode(sequence.tokens)}
            assert continued['messages'] == [*source['messages'], reply]
            for key in {'user_data', 'extra', 'tools'} & set(source):
                assert continued[key] == source[key], key
            assert continued['labels'][len(response.prompt_token_ids) - 1:-1] == sequence.tokens
    assert responses[0].sequences[0].new_input_feature['extra'] == {'k': [1]}
    assert responses[1].sequences[0].new_input_feature['tools'] == trajectory['tools']
