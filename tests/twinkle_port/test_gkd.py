"""cookbook/rl/gkd/gkd_on_policy.py ported: the student samples trajectories (num_samples on SamplingParams), the
teacher scores every ``new_input_feature`` with ``SamplingParams(max_tokens=0, prompt_logprobs=GKD_TOPK)``, and the
cookbook's ``convert_topk_prompt_logprobs`` turns that into GKDLoss tensors. The loss is replaced by what it
relies on: the teacher's top-k rows equal a full forward's ``log_softmax`` top-k at every position."""

from __future__ import annotations

from typing import List, Optional

import pytest
import torch

from twinkle_async import get_device_placement, get_logger
from twinkle_async.data_format import SamplingParams

from .common import MODEL_ID, TOLERANCE

pytestmark = pytest.mark.slow
logger = get_logger()

MAX_NEW_TOKENS = 24
N_SAMPLES = 2
GKD_TOPK = 64


def convert_topk_prompt_logprobs(topk_prompt_logprobs_batch: List[List[Optional[List[tuple]]]]) -> dict:
    """The cookbook's converter, verbatim."""
    batch_logprobs = []
    batch_indices = []
    for seq_topk in topk_prompt_logprobs_batch:
        seq_logprobs = []
        seq_indices = []
        for pos_topk in seq_topk:
            if pos_topk is None:
                seq_logprobs.append([0.0] * len(seq_topk[1]) if len(seq_topk) > 1 and seq_topk[1] else [0.0])
                seq_indices.append([0] * len(seq_topk[1]) if len(seq_topk) > 1 and seq_topk[1] else [0])
            else:
                seq_logprobs.append([lp for _, lp in pos_topk])
                seq_indices.append([tid for tid, _ in pos_topk])
        batch_logprobs.append(seq_logprobs)
        batch_indices.append(seq_indices)
    max_len = max(len(seq) for seq in batch_logprobs)
    topk = GKD_TOPK
    for i in range(len(batch_logprobs)):
        pad_len = max_len - len(batch_logprobs[i])
        if pad_len > 0:
            batch_logprobs[i].extend([[0.0] * topk] * pad_len)
            batch_indices[i].extend([[0] * topk] * pad_len)
    return {
        'teacher_topk_logprobs': torch.roll(torch.tensor(batch_logprobs, dtype=torch.float32), shifts=-1, dims=1),
        'teacher_topk_indices': torch.roll(torch.tensor(batch_indices, dtype=torch.long), shifts=-1, dims=1),
    }


def create_batch() -> list:
    """Prompt-only trajectories, as the cookbook's dataset yields them (set_template, no encode)."""
    return [{'messages': [{'role': 'user', 'content': 'Compute 17 * 3 and explain briefly.'}]},
            {'messages': [{'role': 'user', 'content': 'A train goes 60 km in 1.5 hours. What is its speed?'}]}]


def gkd_step(student_sampler, teacher_sampler):
    """One step of the cookbook's loop, up to the student's forward_backward."""
    student_sampler.set_template('Qwen3_5Template', model_id=MODEL_ID, enable_thinking=False)
    student_sampler.reset_mm_cache()
    teacher_sampler.set_template('Qwen3_5Template', model_id=MODEL_ID, enable_thinking=False)
    teacher_sampler.reset_mm_cache()
    logger.info(get_device_placement())
    batch = create_batch()
    student_sampler.reset_prefix_cache()
    student_sampler.reset_encoder_cache()
    sample_response = student_sampler.sample(
        batch, SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=1.0, num_samples=N_SAMPLES))
    input_data = [seq.new_input_feature for response in sample_response for seq in response.sequences]
    teacher_response = teacher_sampler.sample(
        input_data, SamplingParams(max_tokens=0, temperature=1.0, prompt_logprobs=GKD_TOPK))
    teacher_output = convert_topk_prompt_logprobs([resp.topk_prompt_logprobs for resp in teacher_response])
    return input_data, teacher_response, teacher_output


def test_cookbook_gkd_teacher_scoring(setup, hf_default):
    name, sampler = setup
    input_data, teacher_response, teacher_output = gkd_step(sampler, sampler)
    assert len(input_data) == len(create_batch()) * N_SAMPLES
    longest = max(len(f['input_ids']) for f in input_data)
    assert teacher_output['teacher_topk_logprobs'].shape == (len(input_data), longest, GKD_TOPK)
    for b, (feature, response) in enumerate(zip(input_data, teacher_response)):
        ids = feature['input_ids']
        assert response.prompt_token_ids == ids and response.sequences[0].tokens == []
        with torch.no_grad():
            expected = torch.log_softmax(hf_default(torch.tensor([ids])).logits[0].float(), dim=-1).topk(GKD_TOPK)
        # after the cookbook's roll, row t is the teacher's distribution for the token after position t
        got = teacher_output['teacher_topk_logprobs'][b, :len(ids) - 1]
        assert (got - expected.values[:-1]).abs().max().item() < TOLERANCE, name
        agree = teacher_output['teacher_topk_indices'][b, :len(ids) - 1] == expected.indices[:-1]
        assert agree.float().mean().item() > 0.99, 'the same top-k tokens (up to ties far down the list)'
