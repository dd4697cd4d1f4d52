"""What Ray costs: one replica actor vs the same sampler in-process, for sample() and for streams.

One workload (chat prompts of mixed length, greedy, eos ignored), every request its own concurrent call:
(a) ``AsyncSampler.sample`` in this process, (b) the same through one Ray replica
(``remote_group``, ``dp_size=1``), (c) ``AsyncSampler.stream`` in this process consuming every delta,
(d) the same stream through the Ray replica. Rounds alternate; each keeps its fastest. Both engines use
the same number of torch threads (Ray would give a 1-CPU actor one). Prints tokens/s and (b)/(a), (d)/(c).

    python benchmarks/bench_ray.py                       # torch engine, default model, 32 requests
    python benchmarks/bench_ray.py --engine vllm --model tiny
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vllm_overhead import measure, model_dir_for, sampler_sample, sampler_stream  # noqa: E402

import twinkle_async as ta  # noqa: E402

from common import benchmark_parser, format_table, save_results  # noqa: E402


async def run_all(model_dir: Path, workload, args: argparse.Namespace) -> dict:
    engine_args = {'max_model_len': 1024, 'max_num_seqs': 64, 'dtype': 'float32'}
    if args.engine == 'torch':
        engine_args['num_threads'] = args.threads
    local = ta.AsyncSampler(str(model_dir), engine=args.engine, engine_args=engine_args)
    remote = ta.AsyncSampler(str(model_dir), engine=args.engine, engine_args=engine_args, remote_group='bench',
                             device_mesh=ta.DeviceMesh.from_sizes(dp_size=1), coalesce_s=args.coalesce_s)
    async with local, remote:
        return await measure({
            '(a) sample, in-process': lambda w: sampler_sample(local, w),
            '(b) sample, Ray replica': lambda w: sampler_sample(remote, w),
            '(c) stream, in-process': lambda w: sampler_stream(local, w),
            '(d) stream, Ray replica': lambda w: sampler_stream(remote, w),
        }, workload, args.rounds)


def report(results: dict) -> list[dict]:
    pairs = {'(b) sample, Ray replica': '(a) sample, in-process', '(d) stream, Ray replica': '(c) stream, in-process'}
    rows, payload = [], []
    for name, r in results.items():
        base = results.get(pairs.get(name, name))
        ratio = r.tokens_per_s / base.tokens_per_s
        same = sum(o == b for o, b in zip(r.outputs, base.outputs))
        rows.append([name, r.tokens, f'{r.seconds:.2f}', f'{r.tokens_per_s:.1f}', f'{ratio:.3f}',
                     f'{same}/{len(r.outputs)}'])
        payload.append({'system': name, 'tokens': r.tokens, 'seconds': r.seconds, 'tokens_per_s': r.tokens_per_s,
                        'ratio_to_in_process': ratio})
    print(format_table(['system', 'tokens', 'seconds', 'tokens/s', 'ratio to in-process', 'same tokens'], rows))
    return payload


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument('--engine', choices=['torch', 'vllm'], default='torch')
    parser.add_argument('--model', choices=['default', 'tiny'], default='default')
    parser.add_argument('--num-requests', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--coalesce-s', type=float, default=0.005, help='stream deltas gathered per Ray item')
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from common import build_chat_workload
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    ta.initialize('ray', groups=[ta.DeviceGroup(name='bench', ranks=1, device_type='cpu')],
                  num_cpus=os.cpu_count(), object_store_memory=256 * 2**20)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_dir_for(args.model, Path(scratch))
        workload = build_chat_workload(AutoTokenizer.from_pretrained(model_dir), args.num_requests,
                                       max_tokens_range=(16, 64))
        print(f'engine: {args.engine}, model: {args.model}; workload: {workload.describe()}')
        results = asyncio.run(run_all(model_dir, workload, args))
    payload = report(results)
    save_results(args, workload=workload.describe(), results=payload)


if __name__ == '__main__':
    main()
