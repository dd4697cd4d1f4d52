"""Pure helpers behind update_weights and adapters, tested without an engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from twinkle_async.adapters import check_fits, load_adapter, write_adapter
from twinkle_async.errors import InvalidAdapterError, WeightUpdateError
from twinkle_async.weights import TensorSpec, buckets, checkpoint_specs, conform, named_tensors, next_version

SPECS = {'w': TensorSpec((4, 3), torch.float32)}


def test_conform_casts_floats_and_names_what_is_wrong():
    assert conform('w', torch.ones(4, 3, dtype=torch.bfloat16), SPECS).dtype == torch.float32
    with pytest.raises(WeightUpdateError, match="'layers.0.q' is not a weight.*did you mean 'layers.0.k'"):
        conform('layers.0.q', torch.ones(4, 3), {'layers.0.k': SPECS['w']})
    with pytest.raises(WeightUpdateError, match=r"'w': shape \(3, 4\)"):
        conform('w', torch.ones(3, 4), SPECS)
    with pytest.raises(WeightUpdateError, match='torch.int64 is not a floating-point'):
        conform('w', torch.ones(4, 3, dtype=torch.long), SPECS)
    with pytest.raises(WeightUpdateError, match='expected a torch.Tensor, got list'):
        conform('w', [[1.0] * 3] * 4, SPECS)


def test_named_tensors_takes_mappings_and_pairs_and_refuses_the_rest():
    t = torch.zeros(1)
    assert list(named_tensors({'a': t})) == [('a', t)]
    assert list(named_tensors(iter([('b', t)]))) == [('b', t)]
    with pytest.raises(WeightUpdateError, match='mapping or'):
        list(named_tensors([t]))


def test_buckets_stay_under_the_limit_unless_one_tensor_is_bigger():
    pairs = [(str(i), torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100])]  # float32: 4 bytes each
    assert [sum(t.numel() * 4 for t in b.values()) for b in buckets(pairs, 100)] == [80, 120, 20, 400]
    assert [list(b) for b in buckets(pairs, 100)] == [['0', '1'], ['2'], ['3'], ['4']]


def test_next_version_counts_up_or_takes_the_given_int():
    assert next_version(3, None) == 4 and next_version(3, 10) == 10
    with pytest.raises(WeightUpdateError, match='int'):
        next_version(3, '7')


def test_checkpoint_specs_read_only_the_headers(tiny_model_dir):
    specs = checkpoint_specs(tiny_model_dir)
    weights = load_file(str(tiny_model_dir / 'model.safetensors'))
    assert {name: (tuple(t.shape), t.dtype) for name, t in weights.items()} == \
        {name: (s.shape, s.dtype) for name, s in specs.items()}


def test_adapter_round_trip_and_fit_checks(lora_dirs, tiny_model_dir, tmp_path):
    spec = load_adapter('a', lora_dirs['a'])
    assert spec.rank == 8 and spec.config['peft_type'] == 'LORA'
    check_fits(spec, checkpoint_specs(tiny_model_dir))
    again = load_adapter('a', write_adapter(spec, tmp_path / 'copy'))
    assert again.config == spec.config and all(torch.equal(again.tensors[k], t) for k, t in spec.tensors.items())
    wrong_rank = load_adapter('x', {**spec.config, 'r': 4}, spec.tensors)
    with pytest.raises(InvalidAdapterError, match='expected .* for r=4'):
        check_fits(wrong_rank, checkpoint_specs(tiny_model_dir))
    key = next(iter(spec.tensors))
    elsewhere = load_adapter('y', spec.config, {key.replace('layers.0', 'layers.7'): spec.tensors[key]})
    with pytest.raises(InvalidAdapterError, match='layers.7.*not a linear weight'):
        check_fits(elsewhere, checkpoint_specs(tiny_model_dir))


@pytest.mark.parametrize('config, tensors, message', [
    ({'peft_type': 'PREFIX_TUNING', 'r': 8, 'target_modules': ['q_proj']}, {}, 'only LoRA'),
    ({'r': 0, 'target_modules': ['q_proj']}, {}, 'r must be a positive int'),
    ({'r': 8}, {}, 'no target_modules'),
    ({'r': 8, 'target_modules': ['q_proj'], 'use_dora': True}, {}, 'DoRA'),
    ({'r': 8, 'target_modules': ['q_proj'], 'lora_alpha': 'sixteen'}, {}, 'lora_alpha must be a number'),
    ({'r': 8, 'target_modules': ['q_proj']}, {}, 'has no tensors'),
    ({'r': 8, 'target_modules': ['q_proj']}, {'model.q_proj.weight': torch.zeros(2, 2)}, 'not a floating-point LoRA'),
    ({'r': 8, 'target_modules': ['q_proj']}, {'x.lora_A.weight': torch.zeros(2, 2, dtype=torch.int8)}, 'LoRA A/B'),
])
def test_bad_adapter_configs_and_tensors_are_named(config, tensors, message):
    with pytest.raises(InvalidAdapterError, match=message):
        load_adapter('bad', config, tensors)


def test_adapter_sources_that_are_not_usable(lora_dirs, tmp_path):
    with pytest.raises(InvalidAdapterError, match='letters, digits'):
        load_adapter('has space', lora_dirs['a'])
    with pytest.raises(InvalidAdapterError, match='__base__'):
        load_adapter('__base__', lora_dirs['a'])
    with pytest.raises(InvalidAdapterError, match='no adapter_config.json'):
        load_adapter('a', tmp_path)
    with pytest.raises(InvalidAdapterError, match='needs its tensors'):
        load_adapter('a', json.loads((lora_dirs['a'] / 'adapter_config.json').read_text()))
    with pytest.raises(InvalidAdapterError, match='only with a config'):
        load_adapter('a', lora_dirs['a'], {})
