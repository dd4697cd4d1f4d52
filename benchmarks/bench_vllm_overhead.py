"""What twinkle_async costs on top of vLLM: one workload, one AsyncLLM, four ways, one run.

(a) raw ``AsyncLLM.generate`` driven by hand (FINAL_ONLY outputs, all requests concurrent);
(b) ``AsyncSampler.sample`` on the vLLM engine (same AsyncLLM instance);
(c) ``AsyncSampler.stream`` consuming every delta;
(d) the torch engine on the same workload, for reference.
(a)-(c) alternate over ``--rounds`` rounds; each keeps its fastest round. Prints tokens/s and ratios to (a).

    python benchmarks/bench_vllm_overhead.py                      # default model, 64 requests
    python benchmarks/bench_vllm_overhead.py --model tiny --num-requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twinkle_async as ta  # noqa: E402

from common import (  # noqa: E402
    SystemResult,
    Workload,
    benchmark_parser,
    build_chat_workload,
    build_tiny_llama,
    format_table,
    save_results,
    timed,
)

Runner = Callable[[Workload], Awaitable[list[list[int]]]]


def params_for(max_tokens: int) -> dict[str, Any]:
    return {'max_tokens': max_tokens, 'temperature': 0, 'ignore_eos': True}


async def raw_vllm(llm: Any, workload: Workload) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one(prompt: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in llm.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
            final = output
        return list(final.outputs[0].token_ids)

    return await asyncio.gather(*(one(p, m) for p, m in zip(workload.prompts, workload.max_tokens)))


async def sampler_sample(sampler: ta.AsyncSampler, workload: Workload) -> list[list[int]]:
    responses = await asyncio.gather(*(sampler.sample({'input_ids': p}, params_for(m))
                                       for p, m in zip(workload.prompts, workload.max_tokens)))
    return [r.sequences[0].tokens for r in responses]


async def sampler_stream(sampler: ta.AsyncSampler, workload: Workload) -> list[list[int]]:
    async def one(prompt: list[int], max_tokens: int) -> list[int]:
        tokens: list[int] = []
        async for delta in sampler.stream({'input_ids': prompt}, params_for(max_tokens)):
            tokens += delta.token_ids
        return tokens

    return await asyncio.gather(*(one(p, m) for p, m in zip(workload.prompts, workload.max_tokens)))


async def timed_run(name: str, run: Runner, workload: Workload) -> SystemResult:
    with timed() as watch:
        outputs = await run(workload)
    return SystemResult(name, sum(len(o) for o in outputs), watch.seconds, outputs, watch.cpu_seconds)


async def measure(systems: dict[str, Runner], workload: Workload, rounds: int) -> dict[str, SystemResult]:
    for run in systems.values():
        await run(workload.head(4))  # warm-up
    best: dict[str, SystemResult] = {}
    for _ in range(rounds):
        for name, run in systems.items():
            result = await timed_run(name, run, workload)
            if name not in best or result.seconds < best[name].seconds:
                best[name] = result
    return best


async def run_all(model_dir: Path, workload: Workload, args: argparse.Namespace) -> list[SystemResult]:
    engine_args = {'max_model_len': args.max_model_len, 'max_num_seqs': args.max_num_seqs, 'dtype': args.dtype}
    async with ta.AsyncSampler(str(model_dir), engine='vllm', engine_args=engine_args) as sampler:
        llm = sampler.engine.llm
        results = await measure({
            '(a) raw AsyncLLM.generate': lambda w: raw_vllm(llm, w),
            '(b) AsyncSampler.sample (vllm)': lambda w: sampler_sample(sampler, w),
            '(c) AsyncSampler.stream (vllm)': lambda w: sampler_stream(sampler, w),
        }, workload, args.rounds)
    async with ta.AsyncSampler(str(model_dir), engine='torch', engine_args=engine_args) as sampler:
        results.update(await measure({'(d) AsyncSampler.sample (torch)': lambda w: sampler_sample(sampler, w)},
                                     workload, 1))
    return list(results.values())


def report(results: list[SystemResult], workload: Workload) -> list[dict[str, Any]]:
    base = results[0]
    rows, payload = [], []
    for r in results:
        same = sum(o == b for o, b in zip(r.outputs, base.outputs))
        rows.append([r.system, r.tokens, f'{r.seconds:.2f}', f'{r.tokens_per_s:.1f}',
                     f'{r.tokens_per_s / base.tokens_per_s:.3f}', f'{same}/{len(workload)}'])
        payload.append({'system': r.system, 'tokens': r.tokens, 'seconds': r.seconds, 'tokens_per_s': r.tokens_per_s,
                        'vs_a': r.tokens_per_s / base.tokens_per_s, 'same_tokens_as_a': same})
    print(format_table(['system', 'tokens', 'seconds', 'tokens/s', 'ratio to (a)', 'same tokens as (a)'], rows))
    return payload


def model_dir_for(name: str, scratch: Path) -> Path:
    default = ta.resolve_model(ta.DEFAULT_MODEL)
    if name == 'default':
        return default
    from transformers import AutoTokenizer
    return build_tiny_llama(scratch / 'tiny', AutoTokenizer.from_pretrained(default))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument('--model', choices=['default', 'tiny'], default='default')
    parser.add_argument('--num-requests', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--dtype', default='float32')
    parser.add_argument('--max-num-seqs', type=int, default=64)
    parser.add_argument('--max-model-len', type=int, default=1024)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_dir_for(args.model, Path(scratch))
        from transformers import AutoTokenizer
        workload = build_chat_workload(AutoTokenizer.from_pretrained(model_dir), args.num_requests)
        print(f'model: {args.model} ({args.dtype}); workload: {workload.describe()}')
        results = asyncio.run(run_all(model_dir, workload, args))
    payload = report(results, workload)
    save_results(args, workload=workload.describe(), results=payload)


if __name__ == '__main__':
    main()
