"""cookbook/rl/multi_turn/multi_turn_grpo.py ported: OpenAI-shaped tools (the cookbook's BLACKJACK_TOOL_SCHEMA), an
episode resumed from an OpenAI-shaped tool call and ``role='tool'`` result, tool calls parsed from the model's output
into ``new_input_feature['messages']`` with ids, answered by a blackjack environment, turn after turn. Twinkle's
EnvPool / MultiTurnRollout (twinkle_agentic) are replaced by a small deterministic environment and loop."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest

from twinkle_async import get_logger
from twinkle_async.data_format import SamplingParams

from .common import MODEL_ID

pytestmark = pytest.mark.slow
logger = get_logger()

MAX_TURNS = 3
BLACKJACK_TOOL_SCHEMA = [
    {
        'type': 'function',
        'function': {
            'name': 'play',
            'description': 'Take an action in the blackjack game.',
            'parameters': {
                'type': 'object',
                'properties': {
                    'action': {
                        'type': 'string',
                        'enum': ['hit', 'stand'],
                        'description': 'The action to take: "hit" to draw a card, "stand" to keep current hand.',
                    }
                },
                'required': ['action'],
            },
        },
    }
]
SYSTEM_PROMPT = 'You are a skilled blackjack player. Use the `play` tool to act.'
FIRST_CALL = '<tool_call>{"name": "play", "arguments": {"action": "hit"}}</tool_call>'


class Blackjack:
    """One episode with a fixed deck: 'hit' draws the next card; 'stand' or going over 21 ends it."""

    def __init__(self, deck: List[int], dealer: int) -> None:
        self.deck, self.dealer, self.total, self.done, self.reward = list(deck), dealer, 0, False, 0.0

    def reset(self) -> str:
        self.total = self.deck.pop(0) + self.deck.pop(0)
        return f'New game. Your hand totals {self.total}. Dealer shows {self.dealer}.'

    def step(self, action: str) -> str:
        if action == 'hit':
            card = self.deck.pop(0)
            self.total += card
            if self.total > 21:
                self.done, self.reward = True, -1.0
                return f'You drew a {card}. Your hand totals {self.total}: bust.'
            return f'You drew a {card}. Your hand totals {self.total}. Dealer shows {self.dealer}.'
        self.done, self.reward = True, 1.0 if self.total > 17 else -1.0
        return f'You stand on {self.total}.'


def prepare_trajectories(envs: List[Blackjack]) -> List[Dict[str, Any]]:
    """Each episode resumed after one hit: the call and its result in OpenAI's shape."""
    trajectories = []
    for env in envs:
        first = env.reset()
        result = env.step('hit')
        trajectories.append({'messages': [
            {'role': 'system', 'content': SYSTEM_PROMPT},
            {'role': 'user', 'content': first},
            {'role': 'assistant', 'content': FIRST_CALL, 'tool_calls': [
                {'id': 'call_0', 'type': 'function', 'function': {'name': 'play', 'arguments': '{"action": "hit"}'}}]},
            {'role': 'tool', 'tool_call_id': 'call_0', 'content': result}], 'tools': BLACKJACK_TOOL_SCHEMA})
    return trajectories


def rollout(sampler, trajectories, envs, sampling_params):
    """Sample every unfinished episode, answer its tool calls, repeat; returns the final features and turns."""
    finals: List[Any] = [None] * len(trajectories)
    turns = [0] * len(trajectories)
    active = list(range(len(trajectories)))
    for _ in range(MAX_TURNS):
        if not active:
            break
        responses = sampler.sample([trajectories[i] for i in active], sampling_params)
        still = []
        for i, response in zip(active, responses):
            feature = response.sequences[0].new_input_feature
            finals[i], turns[i] = feature, turns[i] + 1
            message = feature['messages'][-1]
            if not message.get('tool_calls') or envs[i].done:
                continue
            call = message['tool_calls'][0]
            observation = envs[i].step(str(call['function']['arguments'].get('action', 'stand')))
            trajectories[i] = {'messages': feature['messages'] + [
                {'role': 'tool', 'tool_call_id': call['id'], 'content': observation}], 'tools': feature['tools']}
            if not envs[i].done:
                still.append(i)
        active = still
    return finals, turns


def test_cookbook_multi_turn_tool_rounds(setup):
    name, sampler = setup
    sampler.set_template('Qwen3_5Template', model_id=MODEL_ID, enable_thinking=False)
    envs = [Blackjack([5, 3, 2, 9, 10], 9), Blackjack([10, 3, 3, 8, 4], 7), Blackjack([2, 2, 4, 6, 3], 10)]
    trajectories = prepare_trajectories(envs)
    sampling_params = SamplingParams(max_tokens=40, num_samples=1, logprobs=1, temperature=0)
    finals, turns = rollout(sampler, trajectories, envs, sampling_params)
    rewards = [env.reward for env in envs]
    logger.info(f'[{name}] rewards={rewards} turns={turns}')
    calls = [m for f in finals for m in f['messages'] if m['role'] == 'assistant' and m.get('tool_calls')][3:]
    assert calls, 'the model called the tool (greedy, shown the call format in the first turn)'
    for final in finals:
        assert final['tools'] == BLACKJACK_TOOL_SCHEMA
        messages = final['messages']
        for made in messages:
            for call in made.get('tool_calls') or []:
                assert call['type'] == 'function' and call['function']['name'] == 'play'
        ids = [m['tool_call_id'] for m in messages if m['role'] == 'tool']
        assert len(set(ids)) == len(ids), 'every call has its own id'
        completion = sum(1 for label in final['labels'] if label != -100)
        assert completion > 0 and final['length'] == len(final['input_ids'])
    assert any(t > 1 for t in turns)
    second_turn = [f for f, t in zip(finals, turns) if t > 1][0]
    tool_results = [m['content'] for m in second_turn['messages'] if m['role'] == 'tool']
    prompt_text = sampler.template.decode(second_turn['input_ids'])
    assert all(result in prompt_text for result in tool_results), 'tool results reached the prompt'
