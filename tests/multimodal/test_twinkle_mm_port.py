"""Twinkle's multimodal cookbook flows ported by renaming imports (``twinkle`` -> ``twinkle_async``), on the tiny
VLM with the blocking samplers, as the cookbooks build them:

- ``cookbook/rl/grpo/grpo_mm.py``: OlympiadBench-style trajectories (``{'type': 'image', 'url': ...}`` parts from
  ``OlympiadBenchProcessor.preprocess``), ``limit_mm_per_prompt``, ``set_template('Qwen3_5Template', ...)``, the cache
  resets, ``sample(expand_prompts, SamplingParams(..., logprobs=1))``; the trainer's forward on each
  ``new_input_feature`` (its ids and pixel tensors) gives the sampler's logprobs: the pixels reach the trainer.
- ``cookbook/rl/gkd/gkd_on_policy.py``: the teacher scores the student's ``new_input_feature`` (with images) with
  ``SamplingParams(max_tokens=0, prompt_logprobs=k)``; its top-k rows equal a full forward's.
- ``LatexOCRProcessor.preprocess`` (``cookbook/client/twinkle/multi_modal.py``): a message's ``images=[...]`` with an
  ``<image>`` placeholder.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from twinkle_async.data_format import Message, SamplingParams, Trajectory
from twinkle_async.sampler import TorchSampler, vLLMSampler

from .tiny_vlm import picture

MAX_NEW_TOKENS = 8
NUM_GENERATIONS = 2
TOLERANCE = 1e-4
SYSTEM = 'You are a helpful math assistant.'


def olympiad_preprocess(row: Dict[str, Any]) -> Trajectory:
    """``OlympiadBenchProcessor.preprocess``'s core, verbatim but for the Chinese labels."""
    images = [row[f'image_{i}'] for i in range(1, 10) if row.get(f'image_{i}') is not None]
    content_parts = []
    for img in images:
        content_parts.append({'type': 'image', 'url': img})
    if row.get('context'):
        content_parts.append({'type': 'text', 'text': f"Context: {row['context']}\n\n"})
    content_parts.append({'type': 'text', 'text': row['question']})
    user_message = Message(role='user', content=content_parts) if images else Message(role='user',
                                                                                     content=row['question'])
    return Trajectory(messages=[Message(role='system', content=SYSTEM), user_message],
                      user_data=[('ground_truth', row['final_answer'])])


def latex_ocr_preprocess(row: Dict[str, Any]) -> Trajectory:
    """``LatexOCRProcessor.preprocess``, verbatim (the prompt half: the sampler continues it)."""
    return Trajectory(messages=[Message(role='user', content='<image>Using LaTeX to perform OCR on the image.',
                                        images=[row['image']])])


@pytest.fixture(scope='module', params=['torch', 'vllm'])
def mm_sampler(request, vlm_dir):
    engine_args = {'max_model_len': 512, 'limit_mm_per_prompt': {'image': 9}, 'dtype': 'float32'}
    if request.param == 'vllm':
        sampler = vLLMSampler(model_id=str(vlm_dir), engine_args={
            'gpu_memory_utilization': 0.8, 'max_lora_rank': 32, 'enable_lora': True,
            'enable_tower_connector_lora': True, **engine_args})
    else:
        sampler = TorchSampler(model_id=str(vlm_dir), engine_args={'gpu_memory_utilization': 0.8, **engine_args})
    yield sampler
    sampler.shutdown()


def trainer_logprobs(hf_vlm, feature: Dict[str, Any], start: int) -> np.ndarray:
    """What a trainer's forward on ``new_input_feature`` (ids and the carried pixel tensors) gives the completion."""
    model, _ = hf_vlm
    ids = torch.tensor([feature['input_ids']])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=feature['pixel_values'],
                       pixel_attention_mask=torch.as_tensor(feature['pixel_attention_mask'])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = ids[0, start:]
    return logprobs[start - 1:-1].gather(1, targets.unsqueeze(1)).squeeze(1).numpy()


def test_cookbook_grpo_mm_step(mm_sampler, hf_vlm, vlm_dir):
    rows = [{'question': 'What is the area of the shaded region?', 'final_answer': '12', 'image_1': picture(20)},
            {'question': 'Which two figures are congruent?', 'context': 'Two figures.', 'final_answer': 'A, B',
             'image_1': picture(21), 'image_2': picture(22, (64, 64))}]
    batch = [olympiad_preprocess(row) for row in rows]
    mm_sampler.set_template('Qwen3_5Template', model_id=str(vlm_dir), enable_thinking=False)
    mm_sampler.reset_mm_cache()
    sampling_params = SamplingParams(max_tokens=MAX_NEW_TOKENS, num_samples=1, logprobs=1)
    mm_sampler.reset_prefix_cache()
    mm_sampler.reset_encoder_cache()
    expand_prompts = []
    for prompt in batch:
        expand_prompts.extend([prompt] * NUM_GENERATIONS)
    sample_responses = mm_sampler.sample(expand_prompts, sampling_params)
    all_input_data: List[Dict[str, Any]] = []
    all_old_logps: List[List[float]] = []
    all_completion_lengths: List[int] = []
    for sample_response in sample_responses:
        for sequence in sample_response.sequences:
            all_input_data.append(sequence.new_input_feature)
            all_old_logps.append([logprob[0][1] for logprob in sequence.logprobs])
            all_completion_lengths.append(len(sequence.tokens))
    for response, feature, logps, length in zip(sample_responses, all_input_data, all_old_logps,
                                                all_completion_lengths):
        prompt_len = len(response.prompt_token_ids)
        assert len(feature['input_ids']) == prompt_len + length and feature['user_data'][0][0] == 'ground_truth'
        trainer = trainer_logprobs(hf_vlm, feature, prompt_len)
        assert np.abs(trainer - np.array(logps)).max() < TOLERANCE, 'on-policy ratio is 1: the trainer saw the pixels'
    assert [len(f['images']) for f in all_input_data] == [1, 1, 2, 2]


def test_cookbook_gkd_teacher_scores_features_with_images(mm_sampler, hf_vlm):
    student = mm_sampler.sample([olympiad_preprocess({'question': 'Describe it.', 'final_answer': '',
                                                      'image_1': picture(23)})],
                                SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=1.0, num_samples=2))
    input_data = [seq.new_input_feature for response in student for seq in response.sequences]
    teacher = mm_sampler.sample(input_data, SamplingParams(max_tokens=0, temperature=1.0, prompt_logprobs=5))
    model, _ = hf_vlm
    for feature, response in zip(input_data, teacher):
        ids = torch.tensor([feature['input_ids']])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=feature['pixel_values'],
                           pixel_attention_mask=torch.as_tensor(feature['pixel_attention_mask'])).logits[0]
        full = torch.log_softmax(logits.float(), dim=-1)
        for position in range(1, len(feature['input_ids'])):
            expected = full[position - 1].topk(5)
            rows = response.topk_prompt_logprobs[position]
            assert np.allclose([lp for _, lp in rows], expected.values.numpy(), atol=TOLERANCE)


def test_latex_ocr_message_images(mm_sampler, hf_vlm):
    image = picture(24)
    response = mm_sampler.sample(latex_ocr_preprocess({'image': image}),
                                 SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0))
    model, processor = hf_vlm
    text = processor.apply_chat_template([{'role': 'user', 'content': [
        {'type': 'image'}, {'type': 'text', 'text': 'Using LaTeX to perform OCR on the image.'}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[image], return_tensors='pt', add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert response.sequences[0].tokens == out[0, inputs['input_ids'].shape[1]:].tolist()
