"""Load on each engine: throughput and latency vs concurrency, a cancellation storm, memory after each.

For each engine (tiny model by default, the test suite's sizes): a warm-up, then ``--requests`` seeded
random requests (a quarter streamed, exact token counts) at each ``--concurrency``; then a storm of
``--storm`` streams ended at random points. Prints tokens/s, requests/s, p50/p99 latency, RSS of the
process tree (vLLM's engine core included) before/after, and what the engine still holds afterwards.

    python benchmarks/bench_load.py                                   # 2,000 requests at 256, both engines
    python benchmarks/bench_load.py --concurrency 1 4 16 64 256 --requests 500
    python benchmarks/bench_load.py --engines vllm --onednn-cache 1024 0   # vLLM-CPU: oneDNN's cache vs none
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, format_table, save_results  # noqa: E402
from loadgen import run_cancel_storm, run_load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results'


def tiny_model(scratch: Path) -> Path:
    """The test suite's tiny model (2 layers, 1,024-token vocabulary)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
    from tiny_model import build_tiny_model
    return build_tiny_model(scratch / 'tiny')


async def one_engine(engine: str, model_dir: Path, args: argparse.Namespace, onednn_cache: str) -> list[dict]:
    from twinkle_async import AsyncSampler
    engine_args = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': args.max_num_seqs, 'seed': 0}
    if engine == 'vllm':
        engine_args['kv_cache_memory_bytes'] = 64 * 2**20
    label = engine if onednn_cache == 'default' else f'{engine} onednn-cache={onednn_cache}'
    rows = []
    async with AsyncSampler(str(model_dir), engine=engine, engine_args=engine_args) as sampler:
        await run_load(sampler, requests=args.warmup, concurrency=max(args.concurrency), seed=99)
        for concurrency in args.concurrency:
            report = await run_load(sampler, requests=args.requests, concurrency=concurrency)
            rows.append({'engine': label, 'kind': 'load', **report.as_dict()})
        if args.storm:
            storm = await run_cancel_storm(sampler, streams=args.storm)
            rows.append({'engine': label, 'kind': 'storm', **storm.as_dict()})
    return rows


def print_tables(rows: list[dict]) -> None:
    load = [r for r in rows if r['kind'] == 'load']
    print(format_table(
        ['engine', 'in flight', 'requests', 'tok/s', 'req/s', 'p50 s', 'p99 s', 'wrong counts', 'RSS MiB before->after',
         'leaks clean'],
        [[r['engine'], str(r['concurrency']), str(r['requests']), r['tokens_per_s'], r['requests_per_s'], r['p50_s'],
          r['p99_s'], str(r['wrong_token_counts']), f"{r['rss_before_mib']:.0f}->{r['rss_after_mib']:.0f}",
          str(r['leaks_clean'])] for r in load]))
    storms = [r for r in rows if r['kind'] == 'storm']
    if storms:
        print()
        print(format_table(
            ['engine', 'streams', 'seconds', 'before 1st token', 'after last', 'RSS after each wave MiB',
             'leaks clean'],
            [[r['engine'], str(r['streams']), r['seconds'], str(r['before_first_token']), str(r['reached_last_token']),
              ' '.join(f'{v:.0f}' for v in r['rss_after_wave_mib']), str(r['leaks_clean'])] for r in storms]))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, RESULTS / 'load.json')
    parser.add_argument('--engines', nargs='+', default=['torch', 'vllm'], choices=['torch', 'vllm'])
    parser.add_argument('--model', default='tiny', help="'tiny', 'default' or a model dir")
    parser.add_argument('--requests', type=int, default=2000)
    parser.add_argument('--concurrency', type=int, nargs='+', default=[256])
    parser.add_argument('--warmup', type=int, default=2000, help='requests before the timed runs (caches settle)')
    parser.add_argument('--storm', type=int, default=1000, help='streams in the cancellation storm (0: none)')
    parser.add_argument('--max-num-seqs', type=int, default=256)
    parser.add_argument('--onednn-cache', nargs='+', default=['default'],
                        help="vLLM only: ONEDNN_PRIMITIVE_CACHE_CAPACITY values ('default': the engine's, 0 on CPU)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        from twinkle_async import DEFAULT_MODEL, resolve_model
        model_dir = (tiny_model(Path(scratch)) if args.model == 'tiny'
                     else resolve_model(DEFAULT_MODEL if args.model == 'default' else args.model))
        for engine in args.engines:
            for capacity in (args.onednn_cache if engine == 'vllm' else ['default']):
                with mock.patch.dict(os.environ, {} if capacity == 'default' else
                                     {'ONEDNN_PRIMITIVE_CACHE_CAPACITY': capacity}):  # read by engine processes
                    rows += asyncio.run(one_engine(engine, model_dir, args, capacity))
    print_tables(rows)
    save_results(args, rows=rows)
    return rows


if __name__ == '__main__':
    main()
