"""Engine contract: LoRA adapters — PEFT parity, mixed batches, replacement, in-place updates (every engine)."""

from __future__ import annotations

import asyncio
import json

import pytest
from safetensors.torch import load_file

from twinkle_async.errors import AdapterNotFoundError, InvalidAdapterError

from conftest import hf_greedy, load_hf, start_stream, within

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [7, 300, 12, 900],
           [(i * 37) % 1000 + 3 for i in range(280)]]  # fills vLLM-CPU prefix-cache blocks (128 tokens)
GREEDY = {'max_tokens': 16, 'temperature': 0}


@pytest.fixture
async def with_adapters(sampler):
    """The shared sampler; every adapter a test adds is removed afterwards."""
    yield sampler
    for name in sampler.list_adapters():
        await within(sampler.remove_adapter(name))


def peft_greedy(tiny_model_dir, adapter_dir, prompts=PROMPTS) -> list[list[int]]:
    model = load_hf(tiny_model_dir, adapter_dir)
    return [hf_greedy(model, p, 16) for p in prompts]


async def greedy(sampler, adapter_name: str = '') -> list[list[int]]:
    responses = await within(sampler.sample([{'input_ids': p} for p in PROMPTS], GREEDY, adapter_name))
    return [r.sequences[0].tokens for r in responses]


async def test_adapter_from_a_peft_directory_equals_peft_generate(with_adapters, tiny_model_dir, lora_dirs):
    await within(with_adapters.add_adapter('a', str(lora_dirs['a'])))
    assert with_adapters.list_adapters() == ['a']
    assert await greedy(with_adapters, 'a') == peft_greedy(tiny_model_dir, lora_dirs['a'])
    assert await greedy(with_adapters) == [hf_greedy(load_hf(tiny_model_dir), p, 16) for p in PROMPTS]


async def test_adapter_from_a_config_and_tensors(with_adapters, tiny_model_dir, lora_dirs):
    from peft import LoraConfig

    config = json.loads((lora_dirs['b'] / 'adapter_config.json').read_text())
    lora_config = LoraConfig(r=config['r'], lora_alpha=config['lora_alpha'], target_modules=config['target_modules'])
    tensors = load_file(str(lora_dirs['b'] / 'adapter_model.safetensors'))
    await within(with_adapters.add_adapter('b', lora_config, tensors))
    assert await greedy(with_adapters, 'b') == peft_greedy(tiny_model_dir, lora_dirs['b'])


async def test_mixed_adapters_in_one_batch_equal_their_single_adapter_runs(with_adapters, tiny_model_dir, lora_dirs):
    await within(with_adapters.add_adapter('a', lora_dirs['a']))
    await within(with_adapters.add_adapter('b', lora_dirs['b']))
    alone = {name: await greedy(with_adapters, name) for name in ('a', 'b', '')}
    names = ['a', 'b', '', 'b', 'a', ''] * 2
    together = await within(asyncio.gather(*(
        with_adapters.sample({'input_ids': PROMPTS[i % 3]}, GREEDY, name) for i, name in enumerate(names))))
    for i, (name, response) in enumerate(zip(names, together)):
        assert response.sequences[0].tokens == alone[name][i % 3], (name, i)
    assert len({str(alone[name]) for name in ('a', 'b', '')}) == 3, 'a, b and the base model differ pairwise'


async def test_re_adding_a_name_serves_the_new_weights_at_once(with_adapters, tiny_model_dir, lora_dirs):
    await within(with_adapters.add_adapter('a', lora_dirs['a']))
    assert await greedy(with_adapters, 'a') == peft_greedy(tiny_model_dir, lora_dirs['a'])
    await within(with_adapters.add_adapter('a', lora_dirs['a2']))
    assert await greedy(with_adapters, 'a') == peft_greedy(tiny_model_dir, lora_dirs['a2'])


async def test_update_weights_of_an_adapter_in_place(with_adapters, tiny_model_dir, lora_dirs):
    await within(with_adapters.add_adapter('a', lora_dirs['a']))
    base_before = await greedy(with_adapters)
    await greedy(with_adapters, 'a')  # cached prefixes of the old adapter weights must not be reused
    version = await within(with_adapters.update_weights(load_file(str(lora_dirs['a2'] / 'adapter_model.safetensors')),
                                                        adapter_name='a'))
    responses = await within(with_adapters.sample([{'input_ids': p} for p in PROMPTS], GREEDY, 'a'))
    assert [r.sequences[0].tokens for r in responses] == peft_greedy(tiny_model_dir, lora_dirs['a2'])
    assert all(set(r.sequences[0].weight_versions) == {version} for r in responses)
    assert await greedy(with_adapters) == base_before


async def test_bad_adapters_fail_clearly_and_nothing_else_breaks(with_adapters, lora_dirs, tmp_path):
    (tmp_path / 'adapter_config.json').write_text((lora_dirs['a'] / 'adapter_config.json').read_text())
    (tmp_path / 'adapter_model.bin').write_bytes(b'not loaded: pickle is refused')
    with pytest.raises(InvalidAdapterError, match='pickle'):
        await within(with_adapters.add_adapter('p', tmp_path))
    with pytest.raises(AdapterNotFoundError, match='nope'):
        await within(with_adapters.sample({'input_ids': [1, 2]}, GREEDY, adapter_name='nope'))
    with pytest.raises(AdapterNotFoundError, match='nope'):
        await within(with_adapters.remove_adapter('nope'))
    with pytest.raises(AdapterNotFoundError, match='nope'):
        await within(with_adapters.update_weights({}, adapter_name='nope'))
    tensors = load_file(str(lora_dirs['a'] / 'adapter_model.safetensors'))
    key = next(iter(tensors))
    with pytest.raises(InvalidAdapterError, match='lora_A|lora_B'):
        await within(with_adapters.add_adapter('w', {'r': 8, 'target_modules': ['q_proj', 'v_proj']},
                                               {**tensors, key: tensors[key][:, :3]}))
    assert with_adapters.list_adapters() == []
    assert len((await within(with_adapters.sample({'input_ids': [1, 2]}, GREEDY))).sequences[0].tokens) > 0


async def test_removing_an_adapter_aborts_its_requests_in_flight(with_adapters, lora_dirs):
    await within(with_adapters.add_adapter('a', lora_dirs['a']))
    task, deltas = await start_stream(with_adapters, {'input_ids': [5, 6]}, {'max_tokens': 300, 'ignore_eos': True},
                                      'a')
    await within(with_adapters.remove_adapter('a'))
    await within(task)
    assert deltas[-1].finish_reason == 'abort' and with_adapters.list_adapters() == []
    stats = await within(with_adapters.engine.stats())
    assert (stats.running, stats.used_slots) == (0, 0)
