"""cookbook/sample/sample.py ported: a LoRA loaded from ``adapter_path``, Qwen3_5Template by name, Trajectory prompts,
decoding with ``sampler.template.tokenizer`` (the sampler itself comes from conftest, built as the cookbook does)."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from twinkle_async import get_device_placement, get_logger
from twinkle_async.data_format import SamplingParams

from .common import MODEL_ID

pytestmark = pytest.mark.slow
logger = get_logger()


def build_prompts() -> List[Dict[str, Any]]:
    """Build a list of Trajectory dicts (messages format) as prompts."""
    return [
        {'messages': [{'role': 'system', 'content': 'You are a helpful assistant.'},
                      {'role': 'user', 'content': 'What is the capital of France?'}]},
        {'messages': [{'role': 'system', 'content': 'You are a helpful assistant.'},
                      {'role': 'user', 'content': 'Write a short poem about the moon.'}]},
        {'messages': [{'role': 'user', 'content': 'Solve: 2x + 3 = 11. What is x?'}]},
    ]


def run_cookbook(sampler, lora_path) -> list:
    """The cookbook's main() after the sampler is built."""
    sampler.set_template('Qwen3_5Template', model_id=MODEL_ID)
    logger.info(get_device_placement())
    sampling_params = SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, num_samples=1)
    prompts = build_prompts()
    responses = sampler.sample(prompts, sampling_params, adapter_path=str(lora_path))
    texts = []
    for i, response in enumerate(responses):
        for seq in response.sequences:
            text = sampler.template.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            logger.info(f'Prompt {i}: {prompts[i]["messages"][-1]["content"]}\n{text}')
            texts.append(text)
    return texts


def test_template_arguments_reach_every_replica(setup):
    _, sampler = setup
    sampler.set_template('Qwen3_5Template', model_id=MODEL_ID, default_system='You are a pirate.', max_length=64,
                         truncation_strategy='delete')
    short, long = sampler.sample([build_prompts()[2], {'messages': [{'role': 'user', 'content': 'arr ' * 100}]}],
                                 SamplingParams(max_tokens=1))
    assert sampler.template.decode(short.prompt_token_ids).startswith('system\nYou are a pirate.')
    assert long.sequences == [], "truncation_strategy='delete' dropped it"
    sampler.set_template('Qwen3_5Template', model_id=MODEL_ID)


def test_cookbook_sample_with_adapter_path(setup, lora_path, default_model_dir):
    name, sampler = setup
    texts = run_cookbook(sampler, lora_path)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # the adapter really served: greedy tokens equal PEFT's generate with that adapter, not the base model's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype='float32').eval()
    prompt = build_prompts()[0]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    served = sampler.sample([prompt], greedy, adapter_path=str(lora_path))[0]
    ids = served.prompt_token_ids
    with torch.no_grad():
        base_tokens = base.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        peft = PeftModel.from_pretrained(base, lora_path).eval()
        lora_tokens = peft.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert lora_tokens != base_tokens, 'the adapter changes the answer, so the comparison means something'
    assert served.sequences[0].tokens == lora_tokens, name
