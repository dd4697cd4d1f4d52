"""cookbook/rl/grpo/short_math_grpo.py ported: encoded prompts (Qwen3_5Template, truncation 'delete'), expanded
NUM_GENERATIONS times, ``reset_prefix_cache``, ``logprob[0][1]`` as old logprobs, rewards read from
``new_input_feature['messages']``. The trainer is replaced by what it would check: its own forward's logprobs of
the sampled tokens equal the sampler's (on-policy ratio 1), and the labels mark exactly the completion."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from twinkle_async import get_device_placement, get_logger
from twinkle_async.data_format import SamplingParams
from twinkle_async.template import Qwen3_5Template

from .common import MODEL_ID, TOLERANCE, logprobs_of

pytestmark = pytest.mark.slow
logger = get_logger()

NUM_GENERATIONS = 4
MAX_NEW_TOKENS = 40
BATCH_SIZE = 2
SYSTEM_PROMPT = ('You are a helpful math assistant. Solve the problem with minimal but correct reasoning '
                 'and put your final answer within \\boxed{}.')
PROBLEMS = [('Tom has 3 apples and buys 4 more. How many apples does he have?', '7'),
            ('A pen costs 2 dollars. How much do 5 pens cost?', '10'),
            ('What is 12 minus 5? ' + 'Think about it. ' * 200, '7')]  # over max_length: deleted


class GSM8KBrevityReward:
    """The cookbook's brevity reward, verbatim."""

    def __call__(self, trajectories: List[Dict[str, Any]], **kwargs) -> List[float]:
        rewards = []
        for traj in trajectories:
            messages = traj.get('messages', [])
            completion = ''
            for msg in reversed(messages):
                if msg.get('role') == 'assistant':
                    completion = msg.get('content', '')
                    break
            has_answer = bool(re.search(r'\\boxed\{[^}]+\}', completion) or re.search(r'####\s*[\-\d,\.]+', completion))
            if not has_answer:
                rewards.append(0.0)
            else:
                length = len(completion)
                rewards.append(1.0 if length <= 300 else max(0.0, 1.0 - (length - 300) / 3000))
        return rewards


class GSM8KAccuracyReward:
    """A stand-in for Twinkle's: the answer stored by the dataset processor in ``user_data``, found in the reply."""

    def __call__(self, trajectories: List[Dict[str, Any]]) -> List[float]:
        rewards = []
        for traj in trajectories:
            answer = dict(traj['user_data'])['answer']
            rewards.append(float(answer in traj['messages'][-1]['content']))
        return rewards


def create_gsm8k_dataset() -> List[Dict[str, Any]]:
    template = Qwen3_5Template(MODEL_ID, max_length=512, truncation_strategy='delete', enable_thinking=False)
    rows = [{'messages': [{'role': 'system', 'content': SYSTEM_PROMPT}, {'role': 'user', 'content': question}],
             'user_data': [('answer', answer)]} for question, answer in PROBLEMS]  # GSM8KProcessor's shape
    return template.batch_encode(rows, add_generation_prompt=True)  # dataset.encode(add_generation_prompt=True)


def compute_rewards(trajectories: List[Dict[str, Any]]) -> Tuple[List[float], List[float], List[float]]:
    accuracy_rewards = GSM8KAccuracyReward()(trajectories)
    brevity_rewards = GSM8KBrevityReward()(trajectories)
    total_rewards = [a + b for a, b in zip(accuracy_rewards, brevity_rewards)]
    return total_rewards, brevity_rewards, accuracy_rewards


def grpo_step(sampler, batch):
    """One step of the cookbook's loop, up to the trainer call."""
    sampler.set_template('Qwen3_5Template', model_id=MODEL_ID, enable_thinking=False)
    sampling_params = SamplingParams(max_tokens=MAX_NEW_TOKENS, num_samples=1, logprobs=1, temperature=1.0,
                                     top_p=0.95)
    logger.info(get_device_placement())
    expand_prompts = []
    for prompt in batch:
        expand_prompts.extend([prompt] * NUM_GENERATIONS)
    sampler.reset_prefix_cache()
    sample_responses = sampler.sample(expand_prompts, sampling_params)
    all_input_data: List[Dict[str, Any]] = []
    all_old_logps: List[List[float]] = []
    all_completion_lengths: List[int] = []
    for sample_response in sample_responses:
        for sequence in sample_response.sequences:
            all_input_data.append(sequence.new_input_feature)
            all_old_logps.append([logprob[0][1] for logprob in sequence.logprobs])
            all_completion_lengths.append(len(sequence.tokens))
    total_rewards, _, _ = compute_rewards(all_input_data)
    rewards = np.array(total_rewards).reshape(-1, NUM_GENERATIONS)  # GRPOAdvantage(scale='group')
    advantages = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)).ravel()
    return expand_prompts, all_input_data, all_old_logps, all_completion_lengths, advantages


def test_cookbook_grpo_step(setup, hf_default):
    name, sampler = setup
    dataset = create_gsm8k_dataset()
    assert len(dataset) == 2, "truncation_strategy='delete' dropped the over-long prompt"
    batch = dataset[:BATCH_SIZE]
    prompts, inputs, old_logps, lengths, advantages = grpo_step(sampler, batch)
    assert len(inputs) == BATCH_SIZE * NUM_GENERATIONS and advantages.shape == (len(inputs),)
    for prompt, feature, logps, length in zip(prompts, inputs, old_logps, lengths):
        completion = feature['input_ids'][len(prompt['input_ids']):]
        assert feature['input_ids'][:len(prompt['input_ids'])] == prompt['input_ids'] and len(completion) == length
        assert feature['messages'][-1] == {'role': 'assistant', 'content': sampler.template.decode(completion)}
        assert feature['user_data'] == prompt['user_data'] and feature['messages'][0]['content'] == SYSTEM_PROMPT
        p = len(prompt['input_ids'])  # Twinkle's labels are rolled by one: labels[i] is the target of position i
        assert list(feature['labels']) == [-100] * (p - 1) + completion + [-100]
        trainer = logprobs_of(hf_default, feature['input_ids'], len(prompt['input_ids']))
        assert np.abs(trainer.numpy() - np.array(logps)).max() < TOLERANCE, f'{name}: on-policy ratio is 1'
    assert len({tuple(f['input_ids']) for f in inputs[:NUM_GENERATIONS]}) > 1, 'a group holds different samples'
