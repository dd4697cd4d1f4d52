"""A calculator agent written against the ``openai`` client, run against ``twinkle-async serve``; every episode
is a session whose token-exact trajectory (ids, loss mask, logprobs, weight versions) is exported with its reward.

What it shows:
  * an agent that only speaks OpenAI's HTTP API (``AsyncOpenAI``): the calculator is offered both as an OpenAI
    tool (``tools=[...]``: models that emit tool calls get a ``role='tool'`` reply) and as the ``<calc>...</calc>``
    text protocol the small default model follows sometimes (``stop=['</calc>']``);
  * ``X-Session-ID`` per episode: the server keeps what the engine was given and sampled, turn after turn, and
    ``GET /v1/sessions/{id}/trajectory`` hands it to the trainer — no re-tokenization of the chat afterwards;
  * reward = 1 when the final answer equals the task's, written with the trajectory as one JSONL line.

Run (from the repository root), against a running server or one started in this process:
    .venv/bin/twinkle-async serve &  .venv/bin/python examples/openai_agent.py --base-url http://127.0.0.1:8000/v1
    .venv/bin/python examples/openai_agent.py --episodes 8 --output trajectories.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_env import FEW_SHOT, SYSTEM, CalcError, Task, calculate, format_number, make_tasks, parse_answer  # noqa: E402

CALCULATOR = {'type': 'function', 'function': {
    'name': 'calculator', 'description': 'Evaluate an arithmetic expression (+ - * / and parentheses).',
    'parameters': {'type': 'object', 'properties': {'expression': {'type': 'string'}}, 'required': ['expression']}}}


def run_calculator(expression: str) -> str:
    try:
        return format_number(calculate(expression))
    except CalcError as exc:
        return f'error: {exc}'


async def run_episode(client: Any, http: Any, model: str, task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """One episode as a session; returns its reward, turns and the server's trajectory."""
    session = f'episode-{uuid.uuid4().hex[:12]}'
    messages: list[dict[str, Any]] = [{'role': 'system', 'content': SYSTEM}, *FEW_SHOT,
                                      {'role': 'user', 'content': task.question}]
    answer, turns, generated = None, 0, 0
    for turns in range(1, args.max_turns + 1):
        reply = await client.chat.completions.create(
            model=model, messages=messages, tools=[CALCULATOR], stop=['</calc>'], max_tokens=args.max_tokens,
            temperature=args.temperature, seed=args.seed + turns, extra_headers={'X-Session-ID': session})
        message, generated = reply.choices[0].message, generated + reply.usage.completion_tokens
        if message.tool_calls:  # the OpenAI way
            messages.append(message.model_dump(exclude_none=True))
            for call in message.tool_calls:
                expression = json.loads(call.function.arguments or '{}').get('expression', '')
                messages.append({'role': 'tool', 'tool_call_id': call.id, 'content': run_calculator(expression)})
            continue
        text = message.content or ''
        if '<calc>' in text:  # the text protocol: generation stopped at '</calc>'
            expression = text.rpartition('<calc>')[2]
            messages += [{'role': 'assistant', 'content': text + '</calc>'},
                         {'role': 'user', 'content': f'<result>{run_calculator(expression)}</result>'}]
            continue
        answer = parse_answer(text)
        break
    trajectory = (await http.get(f'/sessions/{session}/trajectory')).json()
    await http.delete(f'/sessions/{session}/trajectory')
    reward = float(answer is not None and answer == task.answer)
    return {'question': task.question, 'answer': task.answer, 'given': answer, 'reward': reward, 'turns': turns,
            'completion_tokens': generated, 'trajectory': trajectory}


@contextlib.asynccontextmanager
async def server(args: argparse.Namespace) -> AsyncIterator[str]:
    """``args.base_url``, or a server started here (on a free port) for the run."""
    if args.base_url:
        yield args.base_url
        return
    import uvicorn

    import twinkle_async as ta
    from twinkle_async.serve import create_app

    async with ta.AsyncSampler(args.model, args.engine, {'max_model_len': 1024, 'max_num_seqs': 32}) as sampler:
        served = uvicorn.Server(uvicorn.Config(create_app(sampler, model_name=args.model), host='127.0.0.1', port=0,
                                               log_level='warning'))
        served.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        running = asyncio.create_task(served.serve())
        while not served.started:
            if running.done():
                running.result()
            await asyncio.sleep(0.05)
        try:
            yield f'http://127.0.0.1:{served.servers[0].sockets[0].getsockname()[1]}/v1'
        finally:
            served.should_exit = True
            await running


async def amain(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    import httpx
    from openai import AsyncOpenAI

    args = parse_args(argv)
    tasks = make_tasks(args.episodes, args.seed)
    async with server(args) as base_url:
        client = AsyncOpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=300)
        headers = {'Authorization': f'Bearer {args.api_key}'}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
            model = (await client.models.list()).data[0].id
            episodes = await asyncio.gather(*(run_episode(client, http, model, task, args) for task in tasks))
    if args.output:
        with open(args.output, 'w') as out:
            out.writelines(json.dumps(episode) + '\n' for episode in episodes)
    sampled = sum(sum(s['loss_mask']) for e in episodes for s in e['trajectory']['segments'])
    print(f'{len(episodes)} episodes: mean reward {sum(e["reward"] for e in episodes) / len(episodes):.2f}, '
          f'{sum(e["turns"] for e in episodes)} turns, {sampled} sampled tokens in the exported trajectories')
    return episodes


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--base-url', help='a running server (default: start one here)')
    parser.add_argument('--api-key', default='none')
    parser.add_argument('--model', default='smollm2-135m-instruct', help='when starting the server here')
    parser.add_argument('--engine', default='torch', choices=['torch', 'vllm'])
    parser.add_argument('--episodes', type=int, default=8)
    parser.add_argument('--max-turns', type=int, default=3)
    parser.add_argument('--max-tokens', type=int, default=48)
    parser.add_argument('--temperature', type=float, default=0.7)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', help='write one JSONL line per episode (reward + trajectory)')
    return parser.parse_args(argv)


if __name__ == '__main__':
    asyncio.run(amain())
