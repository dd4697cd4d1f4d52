"""benchmarks/run_all.py: one benchmark for real at smoke size (torch engine only), a failing one, and the
plots-only path from a small synthetic JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import run_all

PNG = b'\x89PNG\r\n\x1a\n'


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_smoke_run_records_figures_failures_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boom = tmp_path / 'bench_boom.py'
    boom.write_text("import sys\nprint('warming up')\nsys.exit('boom: the engine refused to start')\n")
    monkeypatch.setitem(run_all.BENCHMARKS, 'boom', run_all.Bench(boom, {'smoke': []}))
    out, plots = tmp_path / 'out', tmp_path / 'plots'

    data = run_all.main(['--size', 'smoke', '--only', 'boom', 'load', 'vllm_overhead', '--engines', 'torch',
                         '--out', str(out), '--plots', str(plots), '--timeout', '240'])

    saved = json.loads((out / 'run_all.json').read_text())
    assert saved['benchmarks'].keys() == data['benchmarks'].keys() == {'boom', 'load', 'vllm_overhead'}
    machine = saved['machine']
    assert machine['cpus'] >= 1 and machine['cpu_model'] and machine['torch'] and machine['git']
    assert saved['run']['size'] == 'smoke' and saved['run']['seconds'] > 0

    failed = saved['benchmarks']['boom']
    assert failed['status'] == 'failed' and failed['returncode'] == 1
    assert 'warming up' in failed['error_tail'] and 'boom: the engine refused to start' in failed['error_tail']
    assert saved['benchmarks']['vllm_overhead']['status'] == 'skipped'  # it needs the vLLM engine

    load = saved['benchmarks']['load']
    assert load['status'] == 'ok', load.get('error_tail')
    rows = [r for r in load['result']['rows'] if r['kind'] == 'load']
    assert [(r['engine'], r['concurrency']) for r in rows] == [('torch', 1), ('torch', 4), ('torch', 16)]
    assert all(r['tokens_per_s'] > 0 and r['wrong_token_counts'] == 0 for r in rows)
    assert load['seconds'] > 0 and 'cpu_pressure_before' in load
    assert [h['benchmark'] for h in saved['headline']] == ['load']

    assert _is_png(plots / 'throughput_vs_concurrency.png')
    assert not (plots / 'weight_sync.png').exists()  # no figures, no plot
    assert json.loads((plots / 'run_all.json').read_text()) == saved


def test_a_hanging_benchmark_times_out_and_its_processes_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hang = tmp_path / 'bench_hang.py'
    pid_file = tmp_path / 'child.pid'
    hang.write_text("import subprocess, sys, time\n"
                    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                    f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
                    "print('started', flush=True)\ntime.sleep(600)\n")
    monkeypatch.setitem(run_all.BENCHMARKS, 'hang', run_all.Bench(hang, {'smoke': []}))

    data = run_all.main(['--only', 'hang', '--out', str(tmp_path), '--timeout', '3'])

    record = data['benchmarks']['hang']
    assert record['status'] == 'timeout' and 'started' in record['error_tail'] and record['seconds'] < 30
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the benchmark's own child went with it
        os.kill(child, 0)


def _synthetic() -> dict:
    def ok(result: dict) -> dict:
        return {'status': 'ok', 'result': result}

    load_rows = [{'engine': engine, 'kind': 'load', 'concurrency': c, 'tokens_per_s': tps * c ** 0.5, 'p50_s': 0.01 * c,
                  'p99_s': 0.03 * c} for engine, tps in (('torch', 400.0), ('vllm', 250.0)) for c in (1, 4, 16, 64)]
    systems = ['(a) raw AsyncLLM.generate', '(b) AsyncSampler.sample (vllm)', '(c) AsyncSampler.stream (vllm)',
               '(d) AsyncSampler.sample (torch)']
    ray = ['(a) sample, in-process', '(b) sample, Ray replica', '(c) stream, in-process', '(d) stream, Ray replica']
    sync = [{'engine': engine, 'payload': payload, 'gb_per_s': speed, 'copy_gb_per_s': 9.0}
            for engine, speed in (('torch', 3.9), ('vllm', 0.4)) for payload in ('full (mapping)', 'lora r=16')]
    return {
        'run': {'size': 'small', 'started': '2025-01-01T00:00:00+00:00'},
        'machine': {'cpu_model': 'Test CPU', 'cpus': 2, 'torch': '2.13.0+cpu', 'vllm': '0.32.0', 'git': 'abc1234'},
        'benchmarks': {
            'load': ok({'model': 'tiny', 'rows': load_rows + [{'engine': 'torch', 'kind': 'storm'}]}),
            'vllm_overhead': ok({'results': [{'system': s, 'tokens_per_s': 80.0 + i, 'vs_a': (80.0 + i) / 80}
                                             for i, s in enumerate(systems)]}),
            'ray': ok({'results': [{'system': s, 'tokens_per_s': 90.0 - 5 * i, 'ratio_to_in_process': 1 - 0.05 * i}
                                   for i, s in enumerate(ray)]}),
            'weight_sync': ok({'results': sync}),
            'torch_engine': {'status': 'failed', 'error_tail': 'Killed'},
        },
    }


def test_plots_only_redraws_from_json(tmp_path: Path) -> None:
    (tmp_path / 'run_all.json').write_text(json.dumps(_synthetic()))

    data = run_all.main(['--plots-only', '--out', str(tmp_path)])

    for name in ('throughput_vs_concurrency.png', 'streaming_overhead.png', 'weight_sync.png'):
        assert _is_png(tmp_path / name), name
    assert not (tmp_path / 'run_all_logs').exists()  # nothing was run
    assert data['benchmarks']['torch_engine']['status'] == 'failed'


def test_headline_takes_only_succeeded_benchmarks() -> None:
    rows = run_all.headline(_synthetic())

    assert {r['benchmark'] for r in rows} == {'load', 'vllm_overhead', 'ray', 'weight_sync'}
    peaks = {r['figure']: r for r in rows if r['benchmark'] == 'load'}
    assert peaks['torch, peak over the concurrency sweep']['value'] == pytest.approx(400.0 * 8)
    assert 'at 64 in flight' in peaks['vllm, peak over the concurrency sweep']['note']
    assert [r['note'] for r in rows if r['benchmark'] == 'ray'] == ['0.950x of in-process', '0.850x of in-process']
    assert '| weight_sync | vllm update_weights, lora r=16 | 0.40 GB/s | 0.04x of tensor.copy_ |' in run_all.markdown(
        {'headline': rows})


def test_size_flags_and_engine_restriction() -> None:
    load = run_all.BENCHMARKS['load']
    assert load.argv('smoke', ['torch'])[-2:] == ['--engines', 'torch']
    assert run_all.BENCHMARKS['vllm_overhead'].argv('full', ['torch']) is None
    assert run_all.BENCHMARKS['ray'].argv('small', ['vllm'])[-2:] == ['--engine', 'vllm']
    assert all(set(bench.sizes) == set(run_all.SIZES) for bench in run_all.BENCHMARKS.values())
    with pytest.raises(SystemExit):
        run_all.parse_args(['--only', 'nope'])
