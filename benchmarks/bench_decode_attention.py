"""Decode attention on CPU: the native runner's kernel on the paged cache vs SDPA over a padded slot cache.

One layer's decode attention for ``--rows`` rows with the default model's heads (9 query, 3 KV, head size 64),
each row's cached length drawn between half and all of ``--length``; the kernel reads each row's own length from its
blocks (16 positions each, scattered over the pool) in place, SDPA reads every row up to the longest (gathered into
a padded slot cache beforehand, untimed) under a mask. Best of ``--repeats``; the outputs are compared.

Two layouts per length: "own" (every row its own blocks) and "shared" (GRPO-shaped: rows in groups of ``--group``
share the blocks of a prompt of ``longest - 128`` positions, as the samples of one request do, then each has its
own blocks for its last up to 128 positions).

Run:
    .venv/bin/python benchmarks/bench_decode_attention.py
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from twinkle_async.engines.torch.native.kernels import cpu_kernels

from common import benchmark_parser, format_table, machine_info, save_results

BLOCK = 16


def best_ms(run: Callable[[], torch.Tensor], repeats: int) -> float:
    run()
    best = float('inf')
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def main() -> None:
    parser = benchmark_parser(__doc__.split('\n\n')[0])
    parser.add_argument('--rows', type=int, default=256)
    parser.add_argument('--lengths', default='100,500,2000', help='longest cached length per case')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--group', type=int, default=8, help='rows sharing a prompt in the "shared" layout')
    args = parser.parse_args()
    kernel = cpu_kernels()
    if kernel is None:
        raise SystemExit('the kernel could not be built here (see the warning above)')
    print(f'machine: {machine_info()}')
    heads, kv_heads, dim, rows = 9, 3, 64, args.rows
    table, results = [], []
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for longest, layout in ((int(n), layout) for n in args.lengths.split(',') for layout in ('own', 'shared')):
            width = -(-longest // BLOCK)
            pool_keys = torch.randn(rows * width, kv_heads, BLOCK, dim, dtype=dtype)
            pool_values = torch.randn(rows * width, kv_heads, BLOCK, dim, dtype=dtype)
            tables = torch.randperm(rows * width).view(rows, width).contiguous()
            lengths = torch.randint(longest // 2, longest + 1, (rows,))
            if layout == 'shared':
                prompt_blocks = max(longest - 128, 0) // BLOCK
                tables[:, :prompt_blocks] = tables[::args.group, :prompt_blocks].repeat_interleave(args.group, 0)[:rows]
                lengths = torch.randint(prompt_blocks * BLOCK + 1, longest + 1, (rows,))
            query = torch.randn(rows, heads, dim, dtype=dtype)
            keys, values = (pool[tables].transpose(1, 2).flatten(2, 3)[:, :, :longest]
                            for pool in (pool_keys, pool_values))
            visible = torch.arange(longest)[None] < lengths[:, None]
            mask = torch.where(visible, 0.0, float('-inf')).to(dtype)[:, None, None]
            grouped = query.view(rows, kv_heads, heads // kv_heads, dim)
            sdpa = partial(F.scaled_dot_product_attention, grouped, keys, values, attn_mask=mask, scale=0.125)
            ours = partial(kernel.decode_attention, query, pool_keys, pool_values, tables, lengths, 0.125,
                           torch.get_num_threads())
            gap = (ours().float() - sdpa().view(rows, heads, dim).float()).abs().max().item()
            ms_sdpa, ms_ours = best_ms(sdpa, args.repeats), best_ms(ours, args.repeats)
            table.append([str(dtype).removeprefix('torch.'), longest, layout, f'{ms_sdpa:.2f}', f'{ms_ours:.2f}',
                          f'{ms_sdpa / ms_ours:.2f}x', f'{gap:.1e}'])
            results.append({'dtype': str(dtype), 'longest': longest, 'layout': layout, 'sdpa_ms': ms_sdpa,
                            'kernel_ms': ms_ours, 'max_abs_difference': gap})
    print(format_table(['dtype', 'longest', 'blocks', 'SDPA ms', 'kernel ms', 'speed-up', 'max |diff|'], table))
    save_results(args, results=results)


if __name__ == '__main__':
    main()
