"""sleep(level) / wake_up(): the torch engine frees its KV cache (1) and its weights too (2); vLLM needs a GPU."""

from __future__ import annotations

import asyncio

import pytest
from safetensors.torch import load_file

from twinkle_async import AsyncSampler
from twinkle_async.errors import ConfigurationError, NotSupportedError

from conftest import TINY_ENGINE_ARGS, counters_when, within

PROMPT = {'input_ids': [5, 6, 7, 8]}
GREEDY = {'max_tokens': 12, 'temperature': 0, 'ignore_eos': True}


@pytest.fixture
async def torch_engine_sampler(tiny_model_dir):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args=TINY_ENGINE_ARGS) as sampler:
        yield sampler


async def test_level_1_frees_the_kv_cache_and_requests_wait_for_wake_up(torch_engine_sampler):
    sampler = torch_engine_sampler
    before = (await within(sampler.sample(PROMPT, GREEDY))).sequences[0].tokens
    assert sampler.engine.core.cache.keys != []
    await within(sampler.sleep(1))
    assert sampler.engine.core.cache.keys == [] and sampler.engine.core.cache.values == []
    waiting = asyncio.create_task(sampler.sample(PROMPT, GREEDY))
    stats = await within(counters_when(sampler, lambda s: s.waiting == 1))
    assert (stats.running, stats.used_slots) == (0, 0) and not waiting.done(), 'held, not run'
    await within(sampler.wake_up())
    assert (await within(waiting)).sequences[0].tokens == before


async def test_level_2_drops_the_weights_until_they_are_sent_again(torch_engine_sampler, tiny_model_dir):
    sampler = torch_engine_sampler
    before = (await within(sampler.sample(PROMPT, GREEDY))).sequences[0].tokens
    in_flight = asyncio.create_task(sampler.sample(PROMPT, {**GREEDY, 'max_tokens': 400}))
    await within(counters_when(sampler, lambda s: s.running == 1 and s.used_slots == 1))  # running, not queued
    await within(sampler.sleep(2))
    assert (await within(in_flight)).sequences[0].stop_reason == 'abort'
    weight = sampler.engine.weights.slots['model.layers.0.mlp.up_proj.weight'].owner  # its storage
    assert weight.numel() == 0
    with pytest.raises(ConfigurationError, match='still dropped'):
        await within(sampler.wake_up())
    weights = load_file(str(tiny_model_dir / 'model.safetensors'))
    await within(sampler.update_weights(weights))
    await within(sampler.wake_up())
    assert weight.numel() > 0
    assert (await within(sampler.sample(PROMPT, GREEDY))).sequences[0].tokens == before


async def test_vllm_sleep_on_cpu_is_not_supported_and_the_engine_keeps_serving(vllm_sampler):
    with pytest.raises(NotSupportedError, match='GPU'):
        await within(vllm_sampler.sleep(1))
    assert (await within(vllm_sampler.sample(PROMPT, GREEDY))).sequences[0].tokens
