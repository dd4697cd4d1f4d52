"""The embedded default model (SmolLM2-135M-Instruct) on every engine."""

from __future__ import annotations

import pytest
import pytest_asyncio
import torch

from twinkle_async import AsyncSampler

from common import tree_rss_mib
from conftest import ENGINES, within

FRANCE = {'messages': [{'role': 'user', 'content': 'What is the capital of France?'}]}
OTHERS = ['Write a haiku about the sea.', 'List three prime numbers.', 'Say hello in Spanish.']


@pytest.fixture(scope='module')
def hf_default(default_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype='float32').eval()


@pytest_asyncio.fixture(scope='module', params=ENGINES)
async def default_sampler(request):
    """The default model on each engine with its default settings, shared by this module's tests (pytest runs
    both tests on one engine before starting the other)."""
    async with AsyncSampler('smollm2-135m-instruct', engine=request.param) as sampler:
        yield sampler


@pytest.mark.slow
async def test_default_model_answers_paris_and_matches_generate(default_sampler, hf_default):
    chats = [FRANCE] + [{'messages': [{'role': 'user', 'content': text}]} for text in OTHERS]
    responses = await within(default_sampler.sample(chats, {'max_tokens': 40, 'temperature': 0}), 300)
    assert responses[0].sequences[0].decoded == 'The capital of France is Paris.'
    assert responses[0].sequences[0].stop_reason == 'stop', 'ends on the eos token'
    for response in responses:
        prompt = response.prompt_token_ids
        with torch.no_grad():
            expected = hf_default.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
        assert response.sequences[0].tokens == expected[0, len(prompt):].tolist()


def perturbed(model, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights with 5% noise, as a trainer's ``state_dict()`` (the tied lm_head is the embedding)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {name: t + 0.05 * t.std() * torch.randn(t.shape, generator=generator)
               for name, t in model.named_parameters()}
    weights['lm_head.weight'] = weights['model.embed_tokens.weight']
    return weights


@pytest.mark.slow
async def test_default_model_weight_updates_match_generate_and_leave_memory_flat(default_sampler, hf_default):
    sampler = default_sampler
    chats = [FRANCE] + [{'messages': [{'role': 'user', 'content': text}]} for text in OTHERS]
    original, noisy = hf_default.state_dict(), perturbed(hf_default, seed=0)
    expected_model = type(hf_default)(hf_default.config).eval()
    expected_model.load_state_dict(noisy)
    await within(sampler.update_weights(noisy), 300)
    responses = await within(sampler.sample(chats, {'max_tokens': 24, 'temperature': 0}), 300)
    for response in responses:
        prompt = response.prompt_token_ids
        with torch.no_grad():
            expected = expected_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        assert response.sequences[0].tokens == expected[0, len(prompt):].tolist()
    rss = []
    for i in range(12):
        await within(sampler.update_weights(original if i % 2 else noisy), 300)
        rss.append(tree_rss_mib())
    print(f'RSS over 12 updates (MiB): {[round(r) for r in rss]}')
    assert max(rss[2:]) - rss[1] < 200, 'memory grows with every update (MiB)'
    assert (await within(sampler.sample(FRANCE, {'max_tokens': 40, 'temperature': 0}))).sequences[0].decoded \
        == 'The capital of France is Paris.'
