"""The gateway's cost: the same chat requests through HTTP (``twinkle-async serve``), in process
(``AsyncSampler.sample``) and through vLLM's own OpenAI server (``vllm serve``, same vLLM settings), one run.

Each server runs in its own process, one at a time; the client here sends ``--concurrency`` chat completions at
once (greedy, ``ignore_eos``, the same ``max_tokens``), after one warm-up round. Prints generated tokens/s and
per-request latency p50/p99, with each HTTP figure as a fraction of in-process sampling on the same engine.

    python benchmarks/bench_serve.py                     # default model, vllm engine, 64 requests x 64 tokens
    python benchmarks/bench_serve.py --engine torch --skip-vllm-serve
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twinkle_async as ta  # noqa: E402
from twinkle_async.engines.vllm.args import CPU_ENVIRONMENT  # noqa: E402

from common import benchmark_parser, format_table, save_results  # noqa: E402
from loadgen import percentile  # noqa: E402

WORDS = 'the a model token sampler engine batch weight update policy reward agent tool call answer ' \
        'number question step loss train value state action'.split()
REPO = Path(__file__).resolve().parent.parent


def chats(count: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [[{'role': 'user', 'content': ' '.join(rng.choice(WORDS) for _ in range(rng.randint(10, 120)))}]
            for _ in range(count)]


async def timed_all(calls: list[Callable[[], Awaitable[int]]]) -> dict[str, float]:
    """Run every call at once; tokens/s over the wall time and per-call latency percentiles."""
    latencies: list[float] = []

    async def one(call: Callable[[], Awaitable[int]]) -> int:
        began = time.perf_counter()
        tokens = await call()
        latencies.append(time.perf_counter() - began)
        return tokens

    began = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(c) for c in calls)))
    wall = time.perf_counter() - began
    return {'tokens': tokens, 'seconds': wall, 'tokens_per_s': tokens / wall,
            'p50_s': percentile(latencies, 50), 'p99_s': percentile(latencies, 99)}


async def over_http(base_url: str, model: str, messages: list[list[dict[str, str]]], max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key='none', max_retries=0, timeout=600)

    def call(chat: list[dict[str, str]]) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            reply = await client.chat.completions.create(model=model, messages=chat, max_tokens=max_tokens,
                                                         temperature=0, extra_body={'ignore_eos': True})
            return reply.usage.completion_tokens
        return run

    await timed_all([call(c) for c in messages])  # warm-up
    return await timed_all([call(c) for c in messages])


async def in_process(model_dir: Path, engine: str, engine_args: dict[str, Any], messages: list[list[dict[str, str]]],
                     max_tokens: int) -> dict:
    params = {'max_tokens': max_tokens, 'temperature': 0, 'ignore_eos': True}
    async with ta.AsyncSampler(str(model_dir), engine, engine_args) as sampler:
        def call(chat: list[dict[str, str]]) -> Callable[[], Awaitable[int]]:
            async def run() -> int:
                return len((await sampler.sample({'messages': chat}, params)).sequences[0].tokens)
            return run

        await timed_all([call(c) for c in messages])
        return await timed_all([call(c) for c in messages])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


async def with_server(command: list[str], port: int, run: Callable[[str], Awaitable[dict]],
                      env: Optional[dict[str, str]] = None) -> dict:
    """Start ``command`` (a server on ``port``), wait for ``/health``, measure ``run(base_url)``, stop it."""
    import httpx

    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 600
            while True:
                assert process.poll() is None, f'{command[:4]} exited with {process.returncode}'
                assert time.monotonic() < deadline, f'{command[:4]} did not become healthy'
                try:
                    if (await http.get(f'http://127.0.0.1:{port}/health')).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        return await run(f'http://127.0.0.1:{port}/v1')
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def vllm_serve_command(model_dir: Path, port: int, engine_args: dict[str, Any]) -> list[str]:
    """vLLM's OpenAI server on the settings ``VLLMEngine`` uses on CPU (float32, eager, no chunked prefill, LoRA on,
    512 MiB of KV cache), on the same max_model_len and max_num_seqs."""
    return [sys.executable, '-m', 'vllm.entrypoints.openai.api_server', '--model', str(model_dir),
            '--port', str(port), '--host', '127.0.0.1', '--dtype', 'float32', '--seed', '0', '--enforce-eager',
            '--max-model-len', str(engine_args['max_model_len']), '--max-num-seqs', str(engine_args['max_num_seqs']),
            '--no-enable-chunked-prefill', '--max-num-batched-tokens', '8192', '--kv-cache-memory-bytes',
            str(512 * 2**20), '--enable-lora', '--max-loras', '4', '--max-lora-rank', '16',
            '--disable-log-stats']


async def run_all(args: Any) -> dict[str, dict]:
    model_dir = ta.resolve_model(args.model)
    messages = chats(args.concurrency, args.seed)
    engine_args = {'max_model_len': args.max_model_len, 'max_num_seqs': args.concurrency}
    results = {'in-process sample': await in_process(model_dir, args.engine, engine_args, messages, args.max_tokens)}
    port = free_port()
    ours = [sys.executable, '-m', 'twinkle_async', 'serve', '--model', str(model_dir), '--engine', args.engine,
            '--port', str(port), '--max-model-len', str(args.max_model_len),
            '--max-num-seqs', str(args.concurrency)]
    results['twinkle-async serve'] = await with_server(
        ours, port, lambda url: over_http(url, str(model_dir), messages, args.max_tokens))
    if args.engine == 'vllm' and not args.skip_vllm_serve:
        port = free_port()
        results['vllm serve'] = await with_server(
            vllm_serve_command(model_dir, port, engine_args), port, lambda url: over_http(url, str(model_dir), messages,
                                                                               args.max_tokens), CPU_ENVIRONMENT)
    return results


def report(results: dict[str, dict]) -> None:
    base = results['in-process sample']['tokens_per_s']
    rows = [[name, f'{r["tokens"]:d}', r['tokens_per_s'], r['p50_s'], r['p99_s'], r['tokens_per_s'] / base]
            for name, r in results.items()]
    print(format_table(['system', 'tokens', 'tok/s', 'p50 s', 'p99 s', 'x in-process'], rows))
    if 'vllm serve' in results:
        ratio = results['twinkle-async serve']['tokens_per_s'] / results['vllm serve']['tokens_per_s']
        print(f'twinkle-async serve / vllm serve: {ratio:.2f}x tokens/s')


def main(argv: Optional[list[str]] = None) -> dict[str, dict]:
    parser = benchmark_parser(__doc__)
    parser.add_argument('--model', default=ta.DEFAULT_MODEL)
    parser.add_argument('--engine', choices=['torch', 'vllm'], default='vllm')
    parser.add_argument('--concurrency', type=int, default=64)
    parser.add_argument('--max-tokens', type=int, default=64)
    parser.add_argument('--max-model-len', type=int, default=2048, help='the torch engine reserves KV for '
                        'max_num_seqs x max_model_len: 512 fits its default budget at 64 requests')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--skip-vllm-serve', action='store_true')
    args = parser.parse_args(argv)
    results = asyncio.run(run_all(args))
    report(results)
    save_results(args, results=results)
    return results


if __name__ == '__main__':
    main()
