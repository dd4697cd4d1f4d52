"""Top-k / top-p masking of the torch engine: candidates from ``topk`` vs sorting the whole vocabulary.

Times ``sampling._apply_top_k_top_p`` (the engine's) against ``sampling._sorted_top_k_top_p`` (the full sort it
falls back to) on one decode step's logits: ``--batch`` rows over the default model's vocabulary (49,152),
logits drawn as ``N(0, scale)`` (``--scale 8``: peaked like a chat model's; ``0.05``: nearly flat, the nucleus
beyond the candidates, so the fallback runs too). Settings: top-p only, top-k + top-p, and a mix per row.
Reports the best of ``--repeats`` and checks both keep the same tokens.

Run:
    .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch

from twinkle_async.engines.torch import sampling

from common import benchmark_parser, format_table, machine_info, save_results


def best_seconds(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    best, result = float('inf'), torch.empty(0)
    for _ in range(repeats):
        began = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - began)
    return best, result


def main() -> None:
    parser = benchmark_parser(__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--vocab', type=int, default=49152)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    print(f'machine: {machine_info()}')
    b, v = args.batch, args.vocab
    settings = {'top_p 0.9': ([v] * b, [0.9] * b), 'top_k 50 + top_p 0.9': ([50] * b, [0.9] * b),
                'mixed per row': ([[v, 1, 5, 50, v, 300][i % 6] for i in range(b)],
                                  [[0.9, 1.0, 0.5, 0.95, 1.0, 1e-6, 0.7][i % 7] for i in range(b)])}
    rows, results = [], []
    torch.manual_seed(0)
    for scale in (8.0, 0.05):
        logits = torch.randn(b, v) * scale
        for name, (top_k, top_p) in settings.items():
            k, p = torch.tensor(top_k), torch.tensor(top_p)
            ours, kept = best_seconds(partial(sampling._apply_top_k_top_p, logits, k, p), args.repeats)
            full, reference = best_seconds(partial(sampling._sorted_top_k_top_p, logits, k, p), args.repeats)
            differing = int((kept.isinf() != reference.isinf()).sum())
            rows.append([f'N(0,{scale})', name, f'{ours * 1e3:.0f}', f'{full * 1e3:.0f}', f'{full / ours:.2f}x',
                         differing])
            results.append({'scale': scale, 'setting': name, 'ours_s': ours, 'sort_s': full, 'differing': differing})
    print(format_table(['logits', 'setting', 'ours ms', 'full sort ms', 'speed-up', 'tokens kept differently'], rows))
    save_results(args, results=results)


if __name__ == '__main__':
    main()
