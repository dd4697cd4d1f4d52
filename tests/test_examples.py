"""The examples run end to end on the default model at tiny sizes, and report sane figures.

Sampling is seeded; nothing here depends on timing except that rollout and training overlap at all
(the next batch is sampled while a step trains, which takes seconds).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / 'examples'


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


# -- agent_env: pure parts --
def test_calculator_takes_arithmetic_only():
    agent_env = load_example('agent_env')
    assert agent_env.calculate('12 * 7') == 84
    assert agent_env.calculate('(3 + 4) * -2 / 7') == -2
    assert agent_env.format_number(agent_env.calculate('12 × 7')) == '84'
    assert agent_env.format_number(agent_env.calculate('1 / 4')) == '0.25'
    for bad in ['', '2 ** 10', '__import__("os")', 'x + 1', '1 / 0', '[1]', '"a" * 3', '1' * 100]:
        with pytest.raises(agent_env.CalcError):
            agent_env.calculate(bad)


def test_tool_calls_and_answers_are_parsed():
    agent_env = load_example('agent_env')
    assert agent_env.tool_call('<calc>3 + 4</calc>') == '3 + 4'
    assert agent_env.tool_call('ok <calc>1</calc> then <calc>2 * 5</calc>') == '2 * 5'
    assert agent_env.tool_call('no opening</calc>') == ''
    assert agent_env.tool_call('Answer: 7') is None
    assert agent_env.parse_answer('<result>7</result>Answer: 7.') == 7
    assert agent_env.parse_answer('it is 3, no 5') == 5
    assert agent_env.parse_answer('no idea') is None


def test_tool_result_continues_a_stop_string_that_ends_inside_a_token(default_model_dir):
    from transformers import AutoTokenizer

    agent_env = load_example('agent_env')
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    for completion in ['<calc>17 + 25</calc><', '<calc>17 + 25</calc>']:
        ids = tokenizer.encode(completion, add_special_tokens=False)
        continued = ids + agent_env.tool_result_ids(tokenizer, ids, '42')
        assert tokenizer.decode(continued) == '<calc>17 + 25</calc><result>42</result>'


# -- the examples end to end --
async def test_async_grpo_runs_steps_syncs_versions_and_overlaps(default_model_dir):
    grpo = load_example('async_grpo')
    report = await grpo.amain(['--steps', '2', '--prompts-per-step', '2', '--group-size', '2', '--max-tokens', '16',
                               '--model', str(default_model_dir)])
    assert [s['step'] for s in report['steps']] == [1, 2]
    assert report['synced_versions'] == [1, 2] and report['sampler_version'] == 2
    assert report['overlap'] > 0  # step 2's batch was sampled while step 1 trained
    for step in report['steps']:
        assert 0 <= step['reward'] <= 1 and math.isfinite(step['loss'])
        assert step['tokens'] > 0 and step['versioned_tokens'] == step['tokens']  # a version for every token
        assert set(step['token_versions']) <= set(range(step['step']))  # sampled by weights before this step
        assert 0 <= step['staleness'] <= step['max_staleness'] <= 1
    first = report['steps'][0]
    assert first['token_versions'] == [0] and first['staleness'] == 0
    assert first['log_ratio'] < 1e-3  # on-policy: sampler and trainer give the same logprobs
    for step in report['steps']:  # sample_groups kept groups whose rewards differ; the mismatch report
        assert step['accepted_groups'] == 2 and step['generated_tokens'] >= step['tokens']
        assert step['mismatch'].max_abs < 1e-3 < step['mismatch_unaware'].max_abs


@pytest.mark.parametrize('engine', ['torch', pytest.param('vllm', marks=pytest.mark.slow)])  # vLLM starts in 20-80 s
async def test_agent_env_episodes_end_and_agents_share_batches(default_model_dir, engine):
    agent_env = load_example('agent_env')
    report = await agent_env.amain(['--agents', '4', '--max-turns', '2', '--max-tokens', '16', '--seed', '0',
                                    '--engine', engine, '--model', str(default_model_dir)])
    assert report['episodes'] == report['ended'] == sum(report['ended_by'].values()) == 4
    assert 4 <= report['turns'] <= 8
    assert report['tool_calls'] >= 1 and 0 <= report['parse_failures'] <= report['tool_calls']
    assert 0 <= report['accuracy'] <= 1
    assert report['max_running'] > 1  # concurrent agents were in the engine's batch together


# -- openai_agent: the agent against the gateway, on the default model --
def test_openai_agent_exports_each_episodes_sampled_tokens_with_its_reward(tmp_path):
    import asyncio
    import json
    openai_agent = load_example('openai_agent')
    output = tmp_path / 'episodes.jsonl'
    episodes = asyncio.run(openai_agent.amain(['--episodes', '3', '--max-turns', '2', '--max-tokens', '16',
                                               '--output', str(output)]))
    assert [json.loads(line) for line in output.read_text().splitlines()] == episodes
    for episode in episodes:
        assert episode['reward'] == float(episode['given'] == episode['answer'])
        segments = episode['trajectory']['segments']
        assert sum(sum(s['loss_mask']) for s in segments) == episode['completion_tokens'] > 0
        for segment in segments:
            assert len(segment['token_ids']) == len(segment['loss_mask']) == len(segment['logprobs']) \
                == len(segment['weight_versions'])
            for mask, version, logprob in zip(segment['loss_mask'], segment['weight_versions'], segment['logprobs']):
                assert (version is None) == (logprob is None) == (mask == 0), 'recorded on sampled tokens only'
