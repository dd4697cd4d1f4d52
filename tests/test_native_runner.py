"""The torch engine's native runner (its own fused Llama-family model) against the Hugging Face modules it
replaces: greedy tokens equal HF ``generate`` and logprobs a full HF forward, for each family and config variant
it serves; checkpoints it does not serve go to the HF runner (``runner='auto'``) or are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twinkle_async import AsyncSampler
from twinkle_async.errors import EngineArgsError

from conftest import hf_greedy, load_hf, within
from tiny_model import build_family_model

ENGINE_ARGS = {'dtype': 'float32', 'max_model_len': 256, 'max_num_seqs': 8}
VARIANTS = {
    'llama-tied-biased': ('llama', {'tie_word_embeddings': True, 'attention_bias': True, 'mlp_bias': True}),
    'llama3-rope': ('llama', {'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0,
                                                  'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                                  'original_max_position_embeddings': 64}}),
    'mistral': ('mistral', {'sliding_window': None}),
    'qwen2': ('qwen2', {}),
    'qwen3': ('qwen3', {'head_dim': 48}),
}
PROMPTS = [[5, 80, 31, 7, 300], list(range(40, 90)), [9] * 3]


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def variant_dir(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model_type, overrides = VARIANTS[request.param]
    return build_family_model(tiny_model_dir, tmp_path_factory.mktemp(request.param), model_type, **overrides)


async def test_greedy_tokens_and_logprobs_equal_hugging_face(variant_dir: Path):
    hf = load_hf(variant_dir)
    async with AsyncSampler(str(variant_dir), engine='torch', engine_args={**ENGINE_ARGS, 'runner': 'native'}) as s:
        assert s.engine.core.parts.name == 'native'
        responses = [await within(s.sample({'input_ids': p}, {'max_tokens': 12, 'temperature': 0, 'logprobs': 0,
                                                              'ignore_eos': True})) for p in PROMPTS]
    for prompt, response in zip(PROMPTS, responses):
        sequence = response.sequences[0]
        assert sequence.tokens == hf_greedy(hf, prompt, 12)
        with torch.no_grad():
            full = torch.log_softmax(hf(input_ids=torch.tensor([prompt + sequence.tokens])).logits[0].float(), -1)
        expected = full[len(prompt) - 1:-1].gather(1, torch.tensor(sequence.tokens)[:, None])[:, 0]
        got = torch.tensor([row[0][1] for row in sequence.logprobs])
        assert (got - expected).abs().max().item() < 1e-5


async def test_a_checkpoint_the_native_runner_does_not_serve_goes_to_the_hf_runner(tiny_model_dir, tmp_path):
    dynamic = build_family_model(tiny_model_dir, tmp_path, 'llama', rope_parameters={
        'rope_type': 'dynamic', 'rope_theta': 10000.0, 'factor': 2.0})
    async with AsyncSampler(str(dynamic), engine='torch', engine_args=ENGINE_ARGS) as sampler:
        assert sampler.engine.core.parts.name == 'hf'
        tokens = (await within(sampler.sample({'input_ids': PROMPTS[0]}, {'max_tokens': 6, 'temperature': 0,
                                                                          'ignore_eos': True}))).sequences[0].tokens
    assert tokens == hf_greedy(load_hf(dynamic), PROMPTS[0], 6)
    with pytest.raises(EngineArgsError, match="runner='native' cannot serve .*rope_type 'dynamic'"):
        await within(AsyncSampler(str(dynamic), engine='torch', engine_args={**ENGINE_ARGS, 'runner': 'native'})
                     .start())


async def test_runner_hf_forces_the_hugging_face_modules(tiny_model_dir):
    async with AsyncSampler(str(tiny_model_dir), engine='torch', engine_args={**ENGINE_ARGS, 'runner': 'hf'}) as s:
        assert s.engine.core.parts.name == 'hf'
        tokens = (await within(s.sample({'input_ids': PROMPTS[1]}, {'max_tokens': 8, 'temperature': 0,
                                                                    'ignore_eos': True}))).sequences[0].tokens
    assert tokens == hf_greedy(load_hf(tiny_model_dir), PROMPTS[1], 8)
