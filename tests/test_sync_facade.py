"""The blocking facade (Twinkle's interface) over the async core."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from twinkle_async import DeviceMesh, SamplingParams, TorchSampler, vLLMSampler
from twinkle_async.data_format import SampleResponse
from twinkle_async.errors import ConfigurationError, NotSupportedError, TemplateNotFoundError

from conftest import chat, hf_greedy, load_hf


@pytest.fixture(scope='module')
def blocking_sampler(tiny_model_dir):
    sampler = TorchSampler(model_id=str(tiny_model_dir), engine_args={'max_model_len': 256})
    yield sampler
    sampler.close()


def test_sample_one_and_many_with_num_samples_keyword(blocking_sampler):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
    one = blocking_sampler.sample(chat('hi'), sampling_params=params, num_samples=4)
    assert isinstance(one, SampleResponse) and len(one.sequences) == 4
    many = blocking_sampler.sample([chat('a'), {'input_ids': [5, 6, 7]}], sampling_params=params, adapter_name='')
    assert [len(r.sequences[0].tokens) for r in many] == [6, 6]


def test_blocking_stream_matches_sample_and_can_stop_early(blocking_sampler):
    params = {'max_tokens': 10, 'temperature': 0, 'ignore_eos': True}
    tokens = [t for d in blocking_sampler.stream(chat('x = '), params) for t in d.token_ids]
    assert tokens == blocking_sampler.sample(chat('x = '), params).sequences[0].tokens
    engine_stats = blocking_sampler.async_sampler.engine.stats
    aborted_before = blocking_sampler._portal.call(engine_stats).aborted
    stream = blocking_sampler.stream(chat('y'), {'max_tokens': 200, 'ignore_eos': True})
    next(stream)
    stream.close()
    stats = blocking_sampler._portal.call(engine_stats)
    assert (stats.aborted - aborted_before, stats.running, stats.used_slots) == (1, 0, 0), 'closing aborted it'


def test_set_template_by_name_and_unknown_name(blocking_sampler):
    blocking_sampler.set_template('Template', default_system='S')
    tokenizer = blocking_sampler.template.tokenizer
    text = tokenizer.apply_chat_template([{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'q'}],
                                         tokenize=False, add_generation_prompt=True)
    expected = tokenizer.encode(text, add_special_tokens=False)
    assert blocking_sampler.sample(chat('q'), {'max_tokens': 2}).prompt_token_ids == expected
    with pytest.raises(TemplateNotFoundError, match='nope'):
        blocking_sampler.set_template('nope')
    blocking_sampler.set_template('default')


def test_layouts_that_need_ray_raise_clearly_when_running_locally(tiny_model_dir):
    with pytest.raises(NotSupportedError, match='dp_size=2'):
        TorchSampler(model_id=str(tiny_model_dir), device_mesh=DeviceMesh.from_sizes(dp_size=2, tp_size=1))
    with pytest.raises(NotSupportedError, match='tp_size=2'):
        TorchSampler(model_id=str(tiny_model_dir), device_mesh=DeviceMesh.from_sizes(tp_size=2))
    with pytest.raises(ConfigurationError, match="remote_group='sampler' needs initialize"):
        vLLMSampler(model_id=str(tiny_model_dir), remote_group='sampler')


def test_adapters_weights_and_pause_through_the_blocking_facade(blocking_sampler, tiny_model_dir, lora_dirs):
    params = {'max_tokens': 8, 'temperature': 0}
    feature = {'input_ids': [5, 6, 7, 8]}
    base = blocking_sampler.sample(feature, params).sequences[0].tokens
    blocking_sampler.add_adapter_to_model('a', str(lora_dirs['a']))
    assert blocking_sampler.list_adapters() == ['a']
    assert blocking_sampler.sample(feature, params, adapter_name='a').sequences[0].tokens \
        == hf_greedy(load_hf(tiny_model_dir, lora_dirs['a']), feature['input_ids'], 8)
    blocking_sampler.remove_adapter('a')
    blocking_sampler.pause('keep')
    version = blocking_sampler.update_weights(load_file(str(tiny_model_dir / 'model.safetensors')), version=5)
    blocking_sampler.resume()
    response = blocking_sampler.sample(feature, params)
    assert version == blocking_sampler.weight_version == 5 and response.sequences[0].weight_versions == [5] * 8
    assert response.sequences[0].tokens == base


@pytest.mark.slow
def test_vllm_sampler_with_default_arguments_samples_and_streams(tiny_model_dir, lora_dirs):
    sampler = vLLMSampler(model_id=str(tiny_model_dir), device_mesh=DeviceMesh.from_sizes(dp_size=1, tp_size=1),
                          remote_group=None, engine_args={'max_model_len': 256, 'max_num_seqs': 8})
    try:
        responses = sampler.sample([chat('a'), chat('b')], sampling_params=SamplingParams(max_tokens=5, seed=2,
                                                                                          ignore_eos=True),
                                   num_samples=4)
        assert [len(r.sequences) for r in responses] == [4, 4]
        assert all(len(s.tokens) == 5 for r in responses for s in r.sequences)
        deltas = list(sampler.stream(chat('c'), {'max_tokens': 4, 'temperature': 0, 'ignore_eos': True}))
        assert sum(len(d.token_ids) for d in deltas) == 4 and deltas[-1].finish_reason == 'length'
        sampler.add_adapter_to_model('my_lora', str(lora_dirs['a']))  # LoRA is on by default: Twinkle's usage
        adapted = sampler.sample({'input_ids': [5, 6, 7, 8]}, sampling_params={'max_tokens': 8, 'temperature': 0},
                                 adapter_name='my_lora', num_samples=2)
        expected = hf_greedy(load_hf(tiny_model_dir, lora_dirs['a']), [5, 6, 7, 8], 8)
        assert [s.tokens for s in adapted.sequences] == [expected, expected]
    finally:
        sampler.close()
