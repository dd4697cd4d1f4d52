"""PNG plots of a ``run_all.py`` JSON: throughput vs concurrency, streaming overhead, weight-sync GB/s.

Each plot reads only its benchmarks' figures and is skipped when they are missing (benchmark failed or not
run). matplotlib runs on the Agg backend: no display needed.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ['draw_all', 'plot_throughput', 'plot_streaming', 'plot_weight_sync', 'figures_of']

COLORS = {'torch': 'tab:blue', 'vllm': 'tab:orange', 'copy_': 'tab:gray'}


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def figures_of(data: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    """The JSON a benchmark wrote, if it ran and succeeded; else None."""
    record = data.get('benchmarks', {}).get(name) or {}
    return record.get('result') if record.get('status') == 'ok' else None


def _subtitle(data: dict[str, Any]) -> str:
    m, run = data.get('machine', {}), data.get('run', {})
    return (f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} cores, torch {m.get('torch', '?')}, "
            f"vllm {m.get('vllm', '-')} | git {m.get('git', '?')}, {run.get('started', '?')[:10]}, "
            f"size {run.get('size', '?')}")


def _color(label: str) -> Optional[str]:
    return COLORS.get(label.split()[0]) if label else None


def _log_axis(axis: Any) -> None:
    """Label a log axis with plain numbers at 1, 2 and 5 times each power of ten."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: Any) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        return f'{value:g}' if mantissa in (1, 2, 5) else ''

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def _label_bars(ax: Any, bars: Any, texts: list[str]) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha='center', va='bottom',
                    fontsize=8, xytext=(0, 2), textcoords='offset points')


def plot_throughput(data: dict[str, Any], path: Path) -> bool:
    """bench_load's sweep: tokens/s (left) and p50/p99 latency (right) vs requests in flight, one line per engine."""
    load = figures_of(data, 'load')
    rows = [r for r in (load or {}).get('rows', []) if r.get('kind') == 'load']
    if not rows:
        return False
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine in dict.fromkeys(r['engine'] for r in rows):
        mine = sorted((r for r in rows if r['engine'] == engine), key=lambda r: r['concurrency'])
        xs = [r['concurrency'] for r in mine]
        color = _color(engine)
        left.plot(xs, [r['tokens_per_s'] for r in mine], 'o-', label=engine, color=color)
        right.plot(xs, [r['p50_s'] for r in mine], 'o-', label=f'{engine} p50', color=color)
        right.plot(xs, [r['p99_s'] for r in mine], 's--', label=f'{engine} p99', color=color, alpha=0.6)
    ticks = sorted({r['concurrency'] for r in rows})
    for ax in (left, right):
        ax.set_xscale('log', base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel('requests in flight')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel('generated tokens/s')
    left.set_ylim(bottom=0)
    right.set_yscale('log')
    _log_axis(right.yaxis)
    right.set_ylabel('request latency, s')
    fig.suptitle(f"Throughput and latency vs concurrency (bench_load, model {load.get('model', '?')})\n"
                 f'{_subtitle(data)}', fontsize=9)
    return _save(fig, path)


def _bars(ax: Any, results: list[dict[str, Any]], ratio_key: str, title: str) -> None:
    names = [r['system'] for r in results]
    bars = ax.bar(range(len(names)), [r['tokens_per_s'] for r in results],
                  color=['tab:orange' if 'vllm' in n or 'raw' in n else 'tab:blue' for n in names])
    _label_bars(ax, bars, [f"{r['tokens_per_s']:.0f} tok/s\n{r[ratio_key]:.3f}x" for r in results])
    ax.set_xticks(range(len(names)), [textwrap.fill(n, 16, break_on_hyphens=False) for n in names], fontsize=7)
    ax.set_ylabel('generated tokens/s')
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.2)


def plot_streaming(data: dict[str, Any], path: Path) -> bool:
    """bench_vllm_overhead's systems (ratio to raw AsyncLLM) and, if present, bench_ray's (ratio to in-process)."""
    panels = [(figures_of(data, 'vllm_overhead'), 'vs_a', 'vLLM: raw AsyncLLM vs AsyncSampler (ratio to (a))'),
              (figures_of(data, 'ray'), 'ratio_to_in_process', 'Ray replica vs in-process (ratio to in-process)')]
    panels = [(f['results'], key, title) for f, key, title in panels if f and f.get('results')]
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, (results, key, title) in zip(axes[0], panels):
        _bars(ax, results, key, title)
    fig.suptitle(f'Streaming and API overhead\n{_subtitle(data)}', fontsize=9)
    return _save(fig, path)


def plot_weight_sync(data: dict[str, Any], path: Path) -> bool:
    """bench_weight_sync: update_weights GB/s per payload and engine, next to tensor.copy_ of the same bytes."""
    sync = figures_of(data, 'weight_sync')
    results = (sync or {}).get('results', [])
    if not results:
        return False
    payloads = list(dict.fromkeys(r['payload'] for r in results))
    engines = list(dict.fromkeys(r['engine'] for r in results))
    series = {'copy_': [next(r['copy_gb_per_s'] for r in results if r['payload'] == p) for p in payloads]}
    for engine in engines:
        by = {r['payload']: r['gb_per_s'] for r in results if r['engine'] == engine}
        series[engine] = [by.get(p, 0.0) for p in payloads]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(payloads))]
        bars = ax.bar(xs, values, width, label='tensor.copy_ (floor)' if label == 'copy_' else label,
                      color=_color(label))
        _label_bars(ax, bars, [f'{v:.2f}' for v in values])
    ax.set_xticks(range(len(payloads)), payloads)
    ax.set_yscale('log')
    _log_axis(ax.yaxis)
    ax.set_ylabel('GB/s (log scale)')
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    ax.grid(True, axis='y', which='both', alpha=0.3)
    fig.suptitle(f'update_weights throughput (bench_weight_sync)\n{_subtitle(data)}', fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


PLOTS: dict[str, Callable[[dict[str, Any], Path], bool]] = {
    'throughput_vs_concurrency.png': plot_throughput,
    'streaming_overhead.png': plot_streaming,
    'weight_sync.png': plot_weight_sync,
}


def draw_all(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw every plot whose figures are in ``data`` into ``out_dir``; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [out_dir / name for name, plot in PLOTS.items() if plot(data, out_dir / name)]
