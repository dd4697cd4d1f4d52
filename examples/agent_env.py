"""Many tool-using agents sharing one sampler: a multi-turn calculator environment.

What it shows:
  * many agents (asyncio tasks) each ``await sampler.sample(...)`` on their own schedule, and the engine
    batches their requests together (a background task samples ``sampler.engine.stats()`` to prove it);
  * a tool call ended by a stop string: the model writes ``<calc>12 * 7</calc>``, sampling stops at
    ``'</calc>'`` (``include_stop_str_in_output=True`` keeps it in ``decoded``);
  * token-in/token-out multi-turn: the next turn's input is ``sequence.new_input_feature`` (prompt +
    completion ids, exactly what was sampled) extended with the tokenized tool result, never a re-rendered
    chat, so the policy sees (and an RL trainer would train on) the very tokens it produced;
  * a safe calculator (``ast`` with numbers and + - * / only, no ``eval``).

The 135M default model follows the protocol only sometimes; episodes end on an answer, on a turn without
a tool call, or at the turn limit, and the report counts what happened.

Run (from the repository root):
    .venv/bin/python examples/agent_env.py                        # 16 agents, torch engine
    .venv/bin/python examples/agent_env.py --agents 32 --max-turns 3 --engine vllm
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import operator
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import twinkle_async as ta

CALL_START, CALL_END = '<calc>', '</calc>'
SYSTEM = ('You solve arithmetic with a calculator. Write <calc>EXPRESSION</calc> to use it; the result comes back '
          "as <result>VALUE</result>. Then reply 'Answer: VALUE'.")
FEW_SHOT = [  # one worked episode per operation teaches the small model the protocol
    {'role': 'user', 'content': 'What is 3 + 4?'},
    {'role': 'assistant', 'content': '<calc>3 + 4</calc><result>7</result>Answer: 7'},
    {'role': 'user', 'content': 'What is 6 * 9?'},
    {'role': 'assistant', 'content': '<calc>6 * 9</calc><result>54</result>Answer: 54'},
]
_OPERATORS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                      ast.Mult: operator.mul, ast.Div: operator.truediv}
_ANSWER = re.compile(r'Answer:\s*(-?\d+(?:\.\d+)?)')
_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')


# -- the task and the tool (pure functions) --
@dataclass(frozen=True)
class Task:
    question: str
    answer: int


def make_tasks(count: int, seed: int) -> list[Task]:
    """Two-number arithmetic questions with integer answers."""
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice('+-*')
        tasks.append(Task(f'What is {a} {op} {b}?', {'+': a + b, '-': a - b, '*': a * b}[op]))
    return tasks


class CalcError(ValueError):
    """The expression is not plain arithmetic."""


def calculate(expression: str) -> float:
    """Evaluate numbers with + - * / and parentheses; anything else raises CalcError (no ``eval``)."""
    if not expression.strip() or len(expression) > 80:
        raise CalcError(f'bad expression {expression!r}')
    try:
        return _evaluate(ast.parse(expression.replace('×', '*').replace('÷', '/').strip(), mode='eval').body)
    except (SyntaxError, ZeroDivisionError, OverflowError) as exc:
        raise CalcError(f'{expression!r}: {exc}') from None


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise CalcError(f'not allowed in a calculation: {type(node).__name__}')


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f'{value:.6g}'


def tool_call(decoded: str) -> Optional[str]:
    """The expression of a turn that stopped at ``</calc>`` ('' when there is no ``<calc>`` before it),
    or ``None`` when the turn made no tool call."""
    if not decoded.endswith(CALL_END):
        return None
    body = decoded[:-len(CALL_END)]
    start = body.rfind(CALL_START)
    return '' if start < 0 else body[start + len(CALL_START):]


def parse_answer(text: str) -> Optional[float]:
    """The number after 'Answer:', else the last number in the text."""
    match = _ANSWER.search(text)
    numbers = [match.group(1)] if match else _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def tool_result_ids(tokenizer: Any, completion_ids: list[int], result: str) -> list[int]:
    """Token ids that continue the completion with ``<result>...</result>``.

    A stop string can end inside a token: ``'</calc><'`` may be one token, so the completion already holds
    the start of the next text. Continue from what it holds rather than re-tokenizing the whole turn.
    """
    text = f'<result>{result}</result>'
    tail = tokenizer.decode(completion_ids).rpartition(CALL_END)[2]
    if tail and text.startswith(tail):
        text = text[len(tail):]
    return tokenizer.encode(text, add_special_tokens=False)


# -- one agent: a multi-turn episode --
@dataclass
class Episode:
    task: Task
    turns: int = 0
    tool_calls: int = 0
    parse_failures: int = 0
    answer: Optional[float] = None
    ended_by: str = ''  # 'answer', 'no_answer' (a turn without a tool call or a number), 'turn_limit'

    @property
    def correct(self) -> bool:
        return self.answer is not None and abs(self.answer - self.task.answer) < 1e-6


def first_prompt(task: Task) -> dict:
    return {'messages': [{'role': 'system', 'content': SYSTEM}, *FEW_SHOT, {'role': 'user', 'content': task.question}]}


def run_tool(expression: str, episode: Episode) -> str:
    episode.tool_calls += 1
    try:
        return format_number(calculate(expression))
    except CalcError:
        episode.parse_failures += 1
        return 'error'


async def run_episode(sampler: ta.AsyncSampler, task: Task, agent: int, args: argparse.Namespace) -> Episode:
    """Sample turns until the model answers without a tool call, or ``max_turns`` turns were taken."""
    episode, inputs = Episode(task), first_prompt(task)
    for turn in range(args.max_turns):
        params = ta.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                   seed=args.seed + 1000 * agent + turn, stop=[CALL_END],
                                   include_stop_str_in_output=True)
        sequence = (await sampler.sample(inputs, params)).sequences[0]
        episode.turns += 1
        expression = tool_call(sequence.decoded)
        if expression is None:
            episode.answer = parse_answer(sequence.decoded)
            episode.ended_by = 'answer' if episode.answer is not None else 'no_answer'
            return episode
        result = run_tool(expression, episode)
        result_ids = tool_result_ids(sampler.engine.tokenizer, sequence.tokens, result)
        inputs = {'input_ids': list(sequence.new_input_feature['input_ids']) + result_ids}
    episode.ended_by = 'turn_limit'
    return episode


# -- many agents at once, and proof that they share the engine's batches --
async def watch_engine(engine: Any, done: asyncio.Event, interval: float) -> list[int]:
    """Requests running in the engine, sampled until ``done`` (each torch-engine reading waits for a step)."""
    running = []
    while not done.is_set():
        running.append((await engine.stats()).running)
        await asyncio.sleep(interval)
    return running


async def run_agents(sampler: ta.AsyncSampler, tasks: list[Task],
                     args: argparse.Namespace) -> tuple[list[Episode], list[int]]:
    done = asyncio.Event()
    agents = [asyncio.create_task(run_episode(sampler, task, i, args)) for i, task in enumerate(tasks)]
    watcher = asyncio.create_task(watch_engine(sampler.engine, done, args.stats_interval))
    try:
        episodes = await asyncio.gather(*agents)
    finally:
        done.set()
        running = await watcher
    return list(episodes), running


def summarize(episodes: list[Episode], running: list[int], wall_s: float) -> dict:
    busy = [n for n in running if n] or [0]
    ended = {kind: sum(e.ended_by == kind for e in episodes) for kind in ('answer', 'no_answer', 'turn_limit')}
    return {'episodes': len(episodes), 'ended': sum(bool(e.ended_by) for e in episodes), 'ended_by': ended,
            'turns': sum(e.turns for e in episodes), 'tool_calls': sum(e.tool_calls for e in episodes),
            'parse_failures': sum(e.parse_failures for e in episodes),
            'accuracy': sum(e.correct for e in episodes) / len(episodes),
            'max_running': max(running, default=0), 'mean_running': statistics.fmean(busy),
            'stats_samples': len(running), 'wall_s': wall_s}


def print_report(episodes: list[Episode], report: dict) -> None:
    for e in episodes[:8]:
        print(f'  {e.task.question:<18} expected {e.task.answer:>6}  answer {e.answer!s:>8}  '
              f'turns {e.turns}  tool calls {e.tool_calls}  ended by {e.ended_by}')
    print(f"episodes {report['episodes']} (ended {report['ended']}: {report['ended_by']}), turns {report['turns']}, "
          f"tool calls {report['tool_calls']}, parse failures {report['parse_failures']}, "
          f"accuracy {report['accuracy']:.2f}")
    print(f"requests running together in the engine: max {report['max_running']}, "
          f"mean {report['mean_running']:.1f} while busy ({report['stats_samples']} readings); "
          f"wall {report['wall_s']:.1f} s")


# -- entry points --
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--agents', type=int, default=16, help='concurrent agents (one episode each)')
    parser.add_argument('--max-turns', type=int, default=4, help='turns per episode at most')
    parser.add_argument('--max-tokens', type=int, default=32, help='tokens per turn at most')
    parser.add_argument('--temperature', type=float, default=0.7)
    parser.add_argument('--seed', type=int, default=0, help='tasks and sampling seeds')
    parser.add_argument('--engine', choices=['torch', 'vllm'], default='torch')
    parser.add_argument('--model', default=ta.DEFAULT_MODEL, help='model id or local HF directory')
    parser.add_argument('--stats-interval', type=float, default=0.05, help='seconds between engine stats readings')
    return parser.parse_args(argv)


async def amain(argv: Optional[list[str]] = None) -> dict:
    """Run the environment and return the report (for tests and notebooks: ``await amain([...])``)."""
    args = parse_args(argv)
    tasks = make_tasks(args.agents, args.seed)
    engine_args = {'max_model_len': 1024, 'max_num_seqs': max(args.agents, 2)}
    async with ta.AsyncSampler(args.model, engine=args.engine, engine_args=engine_args) as sampler:
        start = time.perf_counter()
        episodes, running = await run_agents(sampler, tasks, args)
        report = summarize(episodes, running, time.perf_counter() - start)
    print_report(episodes, report)
    return report


def main(argv: Optional[list[str]] = None) -> dict:
    return asyncio.run(amain(argv))


if __name__ == '__main__':  # the vLLM engine spawns processes: keep the entry point guarded
    main(sys.argv[1:])
