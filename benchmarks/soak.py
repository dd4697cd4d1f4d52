"""Soak: a bounded mixed workload for a set number of minutes, then what it checked, errors by type, leaks.

Workers (``--concurrency``) loop until the time is up, each picking at random: ``sample`` (1-3 samples),
a stream read to its end, a stream left at a random point (``break``, ``aclose()`` or task cancelled),
a request with a short ``timeout`` (ends 'abort'), and a bad request (must raise ``InvalidRequestError``).
Meanwhile the weights flip every ``--update-every`` seconds between the model's own and a perturbed copy
(``update_weights`` with a new version), ending on the model's own. Every finished request must have
exactly the tokens it asked for (``ignore_eos``). Afterwards the engine must hold nothing, and the
process tree's RSS, threads and child processes are compared with the start. Exit code 1 on any
unexpected error or leak.

    python benchmarks/soak.py --minutes 5                         # torch engine, tiny model
    python benchmarks/soak.py --minutes 30 --engine vllm --model default
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import tree_rss_mib  # noqa: E402
from loadgen import Leaks, leaks, random_prompt, thread_names  # noqa: E402

OPERATIONS = {'sample': 4, 'stream': 2, 'stream-left': 2, 'timeout': 1, 'bad-request': 1}
"""Each worker's next operation, drawn with these weights."""


@dataclass
class SoakReport:
    """What a soak did and found; ``ok`` when nothing unexpected happened and nothing leaked."""

    seconds: float = 0.0
    operations: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: int = 0
    updates: int = 0
    expected_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    wrong_token_counts: int = 0
    rss_mib: list[float] = field(default_factory=list)
    leaks: Optional[Leaks] = None
    new_threads: list[str] = field(default_factory=list)
    new_processes: int = 0

    @property
    def ok(self) -> bool:
        return (not self.unexpected_errors and self.wrong_token_counts == 0 and self.leaks is not None
                and self.leaks.clean and not self.new_threads and self.new_processes == 0)

    def lines(self) -> list[str]:
        rss = self.rss_mib
        return [
            f'ran {self.seconds:.0f} s: {sum(self.operations.values())} operations {dict(self.operations)}, '
            f'{self.tokens} tokens, {self.updates} weight updates',
            f'expected errors: {dict(self.expected_errors) or "none"}; '
            f'unexpected errors: {dict(self.unexpected_errors) or "none"}',
            f'requests with a wrong token count: {self.wrong_token_counts}',
            f'engine afterwards: {self.leaks}',
            f'RSS of the process tree (MiB): start {rss[0]:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f} '
            f'({len(rss)} readings)',
            f'threads left behind: {self.new_threads or "none"}; new child processes: {self.new_processes}',
            'OK' if self.ok else 'FAILED',
        ]


def perturbed(weights: dict[str, Any], seed: int) -> dict[str, Any]:
    """The same tensors plus small seeded noise: a second set of weights of the right names and shapes."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def model_weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file
    weights: dict[str, Any] = {}
    for path in sorted(model_dir.glob('*.safetensors')):
        weights.update(load_file(path))
    return weights


class Soak:
    """One soak over a started sampler; ``await Soak(...).run()`` returns the :class:`SoakReport`."""

    def __init__(self, sampler: Any, model_dir: Path, *, seconds: float, concurrency: int = 32,
                 update_every: float = 10.0, seed: int = 0) -> None:
        self.sampler = sampler
        self.seconds = seconds
        self.concurrency = concurrency
        self.update_every = update_every
        self.rng = random.Random(seed)
        self.original = model_weights(model_dir)
        self.flipped = perturbed(self.original, seed)
        self.report = SoakReport()
        self._deadline = 0.0

    async def run(self) -> SoakReport:
        import psutil
        await leaks(self.sampler)  # one request first: engines start some worker threads lazily (vLLM's renderer)
        threads, children = thread_names(), {p.pid for p in psutil.Process().children(recursive=True)}
        self.report.rss_mib.append(tree_rss_mib())
        start = time.monotonic()
        self._deadline = start + self.seconds
        workers = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]
        await asyncio.gather(self._updater(), self._rss_monitor(), *workers)
        self.report.seconds = time.monotonic() - start
        self.report.leaks = await leaks(self.sampler)
        self.report.rss_mib.append(tree_rss_mib())
        self.report.new_threads = sorted(thread_names() - threads - _default_executor_threads())
        self.report.new_processes = len({p.pid for p in psutil.Process().children(recursive=True)} - children)
        return self.report

    async def _worker(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        names, weights = zip(*OPERATIONS.items())
        while time.monotonic() < self._deadline:
            operation = rng.choices(names, weights)[0]
            self.report.operations[operation] += 1
            try:
                await getattr(self, '_' + operation.replace('-', '_'))(rng)
            except Exception as exc:  # noqa: BLE001 - every failure is counted by type, none may escape
                self.report.unexpected_errors[type(exc).__name__] += 1

    def _prompt(self, rng: random.Random) -> dict[str, list[int]]:
        return random_prompt(rng, self.sampler.engine.vocab_size, (4, 64))

    def _count(self, got: int, wanted: int) -> None:
        self.report.tokens += got
        self.report.wrong_token_counts += got != wanted

    async def _sample(self, rng: random.Random) -> None:
        wanted, samples = rng.randint(1, 32), rng.randint(1, 3)
        response = await self.sampler.sample(self._prompt(rng), {'max_tokens': wanted, 'ignore_eos': True},
                                             num_samples=samples)
        for sequence in response.sequences:
            self._count(len(sequence.tokens), wanted)

    async def _stream(self, rng: random.Random) -> None:
        wanted = rng.randint(1, 32)
        stream = self.sampler.stream(self._prompt(rng), {'max_tokens': wanted, 'ignore_eos': True})
        self._count(sum([len(delta.token_ids) async for delta in stream]), wanted)

    async def _stream_left(self, rng: random.Random) -> None:
        how, after = rng.choice(['break', 'aclose', 'cancel']), rng.randint(0, 20)

        async def read() -> None:
            stream = self.sampler.stream(self._prompt(rng), {'max_tokens': 64, 'ignore_eos': True})
            seen = 0
            async for _ in stream:
                seen += 1
                if seen > after:
                    break
            if how == 'aclose':
                await stream.aclose()

        task = asyncio.create_task(read())
        if how == 'cancel':
            await asyncio.sleep(rng.uniform(0, 0.05))
            task.cancel()
        await asyncio.gather(task, return_exceptions=how == 'cancel')

    async def _timeout(self, rng: random.Random) -> None:
        response = await self.sampler.sample(self._prompt(rng), {'max_tokens': 400, 'ignore_eos': True},
                                             timeout=rng.uniform(0.01, 0.2))
        reason = response.sequences[0].stop_reason
        if reason not in ('abort', 'length'):
            self.report.unexpected_errors[f'timeout ended with {reason!r}'] += 1

    async def _bad_request(self, rng: random.Random) -> None:
        from twinkle_async.errors import InvalidRequestError
        bad = rng.choice([({'input_ids': [self.sampler.engine.vocab_size + 5]}, {}), ({'input_ids': []}, {}),
                          (self._prompt(rng), {'max_tokens': -1}), (self._prompt(rng), {'temperature': 'hot'})])
        try:
            await self.sampler.sample(*bad)
        except InvalidRequestError as exc:
            self.report.expected_errors[type(exc).__name__] += 1
        else:
            self.report.unexpected_errors['bad request accepted'] += 1

    async def _updater(self) -> None:
        while time.monotonic() + self.update_every < self._deadline:
            await asyncio.sleep(self.update_every)
            weights = self.flipped if self.report.updates % 2 == 0 else self.original
            await self._update(weights)
        if self.report.updates % 2:
            await self._update(self.original)

    async def _update(self, weights: dict[str, Any]) -> None:
        try:
            await self.sampler.update_weights(weights)
            self.report.updates += 1
        except Exception as exc:  # noqa: BLE001 - counted, the soak goes on
            self.report.unexpected_errors[f'update_weights {type(exc).__name__}'] += 1

    async def _rss_monitor(self) -> None:
        while time.monotonic() < self._deadline:
            await asyncio.sleep(min(10.0, self.seconds / 10))
            self.report.rss_mib.append(tree_rss_mib())


def _default_executor_threads() -> set[str]:
    """The event loop's own worker threads (``asyncio.to_thread``): they live as long as the loop."""
    executor = asyncio.get_running_loop()._default_executor  # no public accessor
    return {thread.name for thread in getattr(executor, '_threads', ())}


async def soak(engine: str, model_dir: Path, args: argparse.Namespace) -> SoakReport:
    from twinkle_async import AsyncSampler
    engine_args = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': args.max_num_seqs, 'seed': 0}
    async with AsyncSampler(str(model_dir), engine=engine, engine_args=engine_args) as sampler:
        return await Soak(sampler, model_dir, seconds=args.minutes * 60, concurrency=args.concurrency,
                          update_every=args.update_every, seed=args.seed).run()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--minutes', type=float, default=5.0)
    parser.add_argument('--engine', choices=['torch', 'vllm'], default='torch')
    parser.add_argument('--model', default='tiny', help="'tiny' (built in a temp dir), 'default' or a model dir")
    parser.add_argument('--concurrency', type=int, default=32, help='workers, each with one operation in flight')
    parser.add_argument('--update-every', type=float, default=10.0, help='seconds between weight updates')
    parser.add_argument('--max-num-seqs', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        from twinkle_async import DEFAULT_MODEL, resolve_model
        if args.model == 'tiny':
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
            from tiny_model import build_tiny_model
            model_dir = build_tiny_model(Path(scratch) / 'tiny')
        else:
            model_dir = resolve_model(DEFAULT_MODEL if args.model == 'default' else args.model)
        report = asyncio.run(soak(args.engine, model_dir, args))
    print(f'soak: {args.engine} engine, {args.model} model, {args.concurrency} workers')
    print('\n'.join(report.lines()))
    return 0 if report.ok else 1


if __name__ == '__main__':
    sys.exit(main())
