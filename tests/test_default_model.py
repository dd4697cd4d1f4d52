"""The embedded default model (SmolLM2-135M-Instruct) on every engine."""

from __future__ import annotations

import pytest
import torch

from conftest import ENGINES, within
from twinkle_async import AsyncSampler

FRANCE = {'messages': [{'role': 'user', 'content': 'What is the capital of France?'}]}
OTHERS = ['Write a haiku about the sea.', 'List three prime numbers.', 'Say hello in Spanish.']


@pytest.fixture(scope='module')
def hf_default(default_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype='float32').eval()


@pytest.mark.slow
@pytest.mark.parametrize('engine', ENGINES)
async def test_default_model_answers_paris_and_matches_generate(engine, default_model_dir, hf_default):
    async with AsyncSampler('smollm2-135m-instruct', engine=engine) as sampler:
        chats = [FRANCE] + [{'messages': [{'role': 'user', 'content': text}]} for text in OTHERS]
        responses = await within(sampler.sample(chats, {'max_tokens': 40, 'temperature': 0}), 300)
        assert responses[0].sequences[0].decoded == 'The capital of France is Paris.'
        assert responses[0].sequences[0].stop_reason == 'stop', 'ends on the eos token'
        for response in responses:
            prompt = response.prompt_token_ids
            with torch.no_grad():
                expected = hf_default.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
            assert response.sequences[0].tokens == expected[0, len(prompt):].tolist()
