"""How fast each engine takes new weights from a trainer: full base weights and a rank-16 LoRA.

For each engine, ``AsyncSampler.update_weights`` of (a) the default model's full weights, given as a
mapping and as an iterable of pairs, and (b) a rank-16 LoRA on every linear layer, as GB/s, next to a
plain ``tensor.copy_`` of the same bytes in the same run (the floor: what moving those bytes once costs
here). Each figure is the best of ``--rounds``. Then ``--rss-updates`` full updates in a row, with the
resident memory of the process tree after each.

``--replicas N`` (torch engine, a local Ray cluster of N CPUs): the full weights into N Ray replicas, (c) by
``update_weights`` in the sampler's process (tensors through Ray's object store) and (d) streamed by a
``WeightSender`` in a separate trainer process over gloo, each rank receiving its own copy; then (e) the same
trainer streaming into a local (one-engine) sampler. Timed from the call to the new version served.

    python benchmarks/bench_weight_sync.py                    # both engines, default model
    python benchmarks/bench_weight_sync.py --engines torch --rounds 5
    python benchmarks/bench_weight_sync.py --engines --replicas 2   # the Ray / gloo paths alone
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import twinkle_async as ta  # noqa: E402

from common import benchmark_parser, format_table, machine_info, save_results, tree_rss_mib  # noqa: E402

LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    unique = {t.data_ptr(): t for t in tensors.values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def copy_seconds(tensors: dict[str, torch.Tensor], rounds: int) -> float:
    """Best time to ``copy_`` every tensor into a preallocated twin (the floor for moving these bytes)."""
    targets = {name: torch.empty_like(t) for name, t in tensors.items()}
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
        best = min(best, time.perf_counter() - start)
    return best


def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The default model's weights as a trainer's ``state_dict()`` sends them (tied lm_head included)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    weights = {name: t + 1e-3 * torch.randn(t.shape, generator=generator) for name, t in model.named_parameters()}
    if model.config.tie_word_embeddings:
        weights['lm_head.weight'] = weights['model.embed_tokens.weight']
    return weights


def lora_adapter(model_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """A rank-16 LoRA on every linear layer of the default model, saved to ``out_dir``; returns its tensors."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


class PairsOf:
    """The same tensors as a one-shot iterable of pairs (a generator-style source: staged as copies)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __iter__(self):
        return iter(list(self.tensors.items()))


async def best_update(sampler: ta.AsyncSampler, tensors: dict[str, torch.Tensor], rounds: int,
                      adapter_name: Optional[str] = None) -> float:
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        await sampler.update_weights(tensors, adapter_name=adapter_name)
        best = min(best, time.perf_counter() - start)
    return best


async def measure_engine(engine: str, model_dir: Path, base: dict[str, torch.Tensor], lora_dir: Path,
                         lora: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    async with ta.AsyncSampler(str(model_dir), engine=engine) as sampler:
        await sampler.add_adapter('policy', lora_dir)
        await sampler.sample({'input_ids': [1, 2, 3]}, {'max_tokens': 2})
        full = await best_update(sampler, base, args.rounds)
        pairs = await best_update(sampler, PairsOf(base), args.rounds)
        adapter = await best_update(sampler, lora, args.rounds, 'policy')
        rss = []
        for _ in range(args.rss_updates):
            await sampler.update_weights(base)
            rss.append(int(tree_rss_mib()))
        answer = (await sampler.sample({'messages': [{'role': 'user', 'content': 'What is the capital of France?'}]},
                                       {'max_tokens': 12, 'temperature': 0})).sequences[0].decoded
    return {'engine': engine, 'full_s': full, 'pairs_s': pairs, 'lora_s': adapter, 'rss_mib': rss,
            'answer_after': answer}


async def measure_streams(model_dir: Path, base: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """(c) object store and (d) gloo into ``args.replicas`` Ray replicas, (e) gloo into a local sampler."""
    import ray

    engine_args = {'dtype': 'float32', 'max_model_len': 256, 'max_num_seqs': 8}
    ta.initialize('ray', groups=[ta.DeviceGroup(name='bench', ranks=args.replicas)], num_cpus=args.replicas,
                  object_store_memory=2 * 2**30)
    try:
        async with ta.AsyncSampler(str(model_dir), engine='torch', engine_args=engine_args, remote_group='bench',
                                   device_mesh=ta.DeviceMesh.from_sizes(dp_size=args.replicas)) as remote:
            object_store = await best_update(remote, base, args.rounds)
            gloo = await trainer_seconds(await remote.open_weight_channel(), args.rounds)
            versions = [s.weight_version for s in await remote.engine.replica_status()]
    finally:
        ta.initialize('local')
        ray.shutdown()
    async with ta.AsyncSampler(str(model_dir), engine='torch', engine_args=engine_args) as local:
        gloo_local = await trainer_seconds(await local.open_weight_channel(), args.rounds)
    return {'object_store_s': object_store, 'gloo_s': gloo, 'gloo_local_s': gloo_local, 'versions': versions}


async def trainer_seconds(address: str, rounds: int) -> float:
    """Best time of ``rounds`` sends by a trainer process (this script with ``--as-trainer``)."""
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, '--as-trainer', address, str(rounds),
                                                   stdout=asyncio.subprocess.PIPE)
    stdout, _ = await process.communicate()
    assert process.returncode == 0, 'the trainer process failed'
    return float(stdout.decode().split()[-1])


def run_trainer(address: str, rounds: int) -> None:
    """The trainer's side: the same weights as ``base_weights``, sent ``rounds`` times; prints the best time."""
    weights = base_weights(ta.resolve_model(ta.DEFAULT_MODEL))
    best = float('inf')
    with ta.WeightSender(address) as sender:
        for _ in range(rounds):
            start = time.perf_counter()
            sender.send(weights)
            best = min(best, time.perf_counter() - start)
    print(best)


def report_streams(streams: dict[str, Any], base: dict[str, torch.Tensor], copy_full: float,
                   replicas: int) -> list[dict[str, Any]]:
    size = nbytes(base)
    rows, payload = [], []
    for name, seconds in ((f'(c) object store -> {replicas} Ray replicas', streams['object_store_s']),
                          (f'(d) trainer process -> {replicas} Ray replicas, gloo', streams['gloo_s']),
                          ('(e) trainer process -> local sampler, gloo', streams['gloo_local_s'])):
        rows.append([name, f'{size / 1e6:.0f}', f'{seconds:.3f}', f'{size / seconds / 1e9:.3f}',
                     f'{copy_full / seconds:.3f}'])
        payload.append({'path': name, 'bytes': size, 'seconds': seconds, 'gb_per_s': size / seconds / 1e9})
    print(format_table(['path (full weights, torch engine)', 'MB', 'seconds', 'GB/s', 'ratio to copy_'], rows))
    print(f"replicas' weight versions after: {streams['versions']}")
    return payload


def report(results: list[dict[str, Any]], base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
           copy_full: float, copy_lora: float) -> list[dict[str, Any]]:
    full_bytes, lora_bytes = nbytes(base), nbytes(lora)
    rows: list[list[Any]] = [['tensor.copy_', 'full', f'{full_bytes / 1e6:.0f}', f'{copy_full:.3f}',
                              f'{full_bytes / copy_full / 1e9:.2f}', '1.000'],
                             ['tensor.copy_', 'lora r=16', f'{lora_bytes / 1e6:.1f}', f'{copy_lora:.4f}',
                              f'{lora_bytes / copy_lora / 1e9:.2f}', '1.000']]
    payload = []
    for r in results:
        for kind, seconds, size, floor in (('full (mapping)', r['full_s'], full_bytes, copy_full),
                                           ('full (iterator)', r['pairs_s'], full_bytes, copy_full),
                                           ('lora r=16', r['lora_s'], lora_bytes, copy_lora)):
            rows.append([r['engine'], kind, f'{size / 1e6:.1f}', f'{seconds:.3f}', f'{size / seconds / 1e9:.3f}',
                         f'{floor / seconds:.3f}'])
            payload.append({'engine': r['engine'], 'payload': kind, 'bytes': size, 'seconds': seconds,
                            'gb_per_s': size / seconds / 1e9, 'copy_gb_per_s': size / floor / 1e9})
    print(format_table(['system', 'payload', 'MB', 'seconds', 'GB/s', 'ratio to copy_'], rows))
    for r in results:
        rss = r['rss_mib']
        if rss:
            print(f"{r['engine']}: RSS of the process tree over {len(rss)} full updates: first {rss[0]} MiB, "
                  f"min {min(rss)}, max {max(rss)}, last {rss[-1]} (spread {max(rss) - min(rss)} MiB)")
        print(f"{r['engine']}: greedy answer after the updates: {r['answer_after']!r}")
    return payload


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument('--engines', nargs='*', default=['torch', 'vllm'], choices=['torch', 'vllm'])
    parser.add_argument('--replicas', type=int, default=0, help='also the Ray / gloo paths into this many replicas')
    parser.add_argument('--as-trainer', nargs=2, metavar=('ADDRESS', 'ROUNDS'), help=argparse.SUPPRESS)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--rss-updates', type=int, default=20)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.as_trainer:
        return run_trainer(args.as_trainer[0], int(args.as_trainer[1]))
    model_dir = ta.resolve_model(ta.DEFAULT_MODEL)
    base = base_weights(model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        lora = lora_adapter(model_dir, Path(scratch) / 'lora')
        copy_full, copy_lora = copy_seconds(base, args.rounds), copy_seconds(lora, args.rounds)
        results = [asyncio.run(measure_engine(engine, model_dir, base, Path(scratch) / 'lora', lora, args))
                   for engine in args.engines]
    streams = asyncio.run(measure_streams(model_dir, base, args)) if args.replicas else None
    print(f'model: {ta.DEFAULT_MODEL} (float32); machine: {machine_info()}')
    payload = report(results, base, lora, copy_full, copy_lora)
    if streams is not None:
        payload += report_streams(streams, base, copy_full, args.replicas)
    save_results(args, results=payload, rss_mib={r['engine']: r['rss_mib'] for r in results})


if __name__ == '__main__':
    main()
