"""Shared helpers for the benchmarks: workloads, timing, a tiny model builder and table printing.

Nothing here depends on ``twinkle_async``'s internals, so baselines and our engines see the same inputs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

__all__ = ['Workload', 'SystemResult', 'build_chat_workload', 'build_tiny_llama', 'timed', 'format_table',
           'write_json', 'count_mismatches', 'machine_info', 'iter_batches',
           'cpu_pressure', 'git_revision', 'best_of',
           'wait_for_quiet_cpu', 'tree_rss_mib']

T = TypeVar('T')

_SYSTEM_PROMPTS = ['Be brief.', 'You are a careful assistant.', 'Answer like a pirate.', None, None, None]

_QUESTIONS = [
    'What is the capital of France?',
    'Explain how a hash map works.',
    'Write a haiku about autumn rain.',
    'Why is the sky blue?',
    'Summarize the plot of Hamlet in three sentences.',
    'How do I reverse a linked list in Python?',
    'What are the main causes of inflation?',
    'Give me a recipe for a quick vegetarian dinner.',
    'What is the difference between TCP and UDP?',
    'Translate "good morning, how are you?" into Spanish and German.',
    'List five tips for better sleep.',
    'How does photosynthesis turn light into chemical energy?',
    'What should I pack for a three-day hiking trip?',
    'Explain gradient descent to a high-school student.',
    'Write a short story about a robot that learns to paint.',
    'What is a prime number? Give three examples.',
]

_CONTEXT = [
    'I am preparing for an exam next week and want to understand the topic well.',
    'Please keep the explanation simple, because I am new to this subject.',
    'My friend told me something different yesterday, so I would like a second opinion.',
    'I have read a few articles about it, but they were full of jargon and hard to follow.',
    'Some background: I work as a nurse and rarely have time to read long texts.',
    'Earlier today I tried to look it up in an old encyclopedia from my grandparents.',
    'It would help if you could include a concrete example from everyday life.',
    'I am writing a blog post and need an accurate, friendly summary for my readers.',
    'The last time I asked, the answer was far too long, so please be concise.',
    'We discussed this at dinner and nobody at the table could agree on the answer.',
    'If there are common misconceptions about it, please point them out as well.',
    'I live in a small town near the mountains where the winters are long and cold.',
    'My daughter asked me about it and I want to explain it correctly to her.',
    'Feel free to use a numbered list if that makes the answer clearer to read.',
]


@dataclass(frozen=True)
class Workload:
    """Prompts (token ids), the number of tokens to generate for each one, and samples per prompt."""

    prompts: list[list[int]]
    max_tokens: list[int]
    num_samples: int = 1

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens) * self.num_samples

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.max_tokens[:n], self.num_samples)

    def expanded(self) -> Workload:
        """Each prompt repeated once per sample, one sample each (for systems without ``num_samples``)."""
        n = self.num_samples
        return Workload([p for p in self.prompts for _ in range(n)], [m for m in self.max_tokens for _ in range(n)])

    def describe(self) -> str:
        lengths = [len(p) for p in self.prompts]
        samples = f' x {self.num_samples} samples' if self.num_samples > 1 else ''
        return (f'{len(self)} requests{samples}, prompt tokens {min(lengths)}-{max(lengths)} (sum {sum(lengths)}), '
                f'max_tokens {min(self.max_tokens)}-{max(self.max_tokens)} (useful tokens {self.useful_tokens})')


@dataclass
class SystemResult:
    """One system's timed run: generated tokens per request, useful token count, wall time."""

    system: str
    tokens: int
    seconds: float
    outputs: list[list[int]] = field(repr=False, default_factory=list)
    cpu_seconds: float = float('nan')  # process CPU time (all threads) during the timed run
    cpu_stall: float = float('nan')  # CPU pressure during the timed run (0..1), see ``timed``
    peak_samples: int = 0  # samples holding KV at once, where the system reports it
    peak_rss_mib: float = float('nan')  # process tree, where watched
    preemptions: Optional[int] = None  # preempted during the timed run (torch: samples, vLLM: requests)

    @property
    def cpu_util(self) -> float:
        """CPU seconds per wall second: about the thread count when the machine is not contended."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else float('nan')

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float('nan')


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded['input_ids'] if hasattr(encoded, 'keys') else encoded)


def _messages(rng: random.Random, target_tokens: int, tokenizer: Any) -> list[int]:
    """A chat prompt of about ``target_tokens`` tokens: a question grown with context sentences."""
    system = rng.choice(_SYSTEM_PROMPTS)
    head = [{'role': 'system', 'content': system}] if system else []
    parts = [rng.choice(_QUESTIONS)]
    ids = _chat_ids(tokenizer, head + [{'role': 'user', 'content': parts[0]}])
    while len(ids) < target_tokens:
        parts.insert(rng.randrange(len(parts)), rng.choice(_CONTEXT))
        ids = _chat_ids(tokenizer, head + [{'role': 'user', 'content': ' '.join(parts)}])
    return ids


def build_chat_workload(tokenizer: Any, num_requests: int, seed: int = 0, prompt_range: tuple[int, int] = (20, 300),
                        max_tokens_range: tuple[int, int] = (16, 128)) -> Workload:
    """Chat prompts of mixed length (via the tokenizer's chat template) with mixed ``max_tokens``, seeded."""
    rng = random.Random(seed)
    prompts, max_tokens = [], []
    for _ in range(num_requests):
        prompts.append(_messages(rng, rng.randint(*prompt_range), tokenizer))
        max_tokens.append(rng.randint(*max_tokens_range))
    return Workload(prompts, max_tokens)


def build_tiny_llama(out_dir: Path, tokenizer: Any, seed: int = 0, hidden_size: int = 256, num_layers: int = 4,
                     num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64) -> Path:
    """Save a randomly initialised (seeded) Llama with ``tokenizer``'s vocabulary into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass
class Stopwatch:
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    cpu_stall: float = float('nan')  # share of the wall time in which some task here waited for a CPU (PSI)


class timed:
    """``with timed() as t: ...`` then ``t.seconds`` (wall), ``t.cpu_seconds`` (this process, all threads)
    and ``t.cpu_stall`` (Linux CPU pressure over the interval, 0..1; NaN where PSI is unavailable)."""

    def __enter__(self) -> Stopwatch:
        self._watch = Stopwatch()
        self._stall = _cpu_stall_us()
        self._cpu = time.process_time()
        self._start = time.perf_counter()
        return self._watch

    def __exit__(self, *exc: object) -> None:
        watch = self._watch
        watch.seconds = time.perf_counter() - self._start
        watch.cpu_seconds = time.process_time() - self._cpu
        stall = _cpu_stall_us()
        if stall is not None and self._stall is not None and watch.seconds > 0:
            watch.cpu_stall = (stall - self._stall) / 1e6 / watch.seconds


def best_of(repeats: int, run: Callable[[], T]) -> tuple[T, Stopwatch]:
    """Run ``run`` ``repeats`` times; the result and timing of the fastest run."""
    best: Optional[tuple[T, Stopwatch]] = None
    for _ in range(max(repeats, 1)):
        with timed() as watch:
            result = run()
        if best is None or watch.seconds < best[1].seconds:
            best = (result, watch)
    assert best is not None
    return best


def _psi_cpu_some() -> Optional[dict[str, float]]:
    try:
        first = Path('/proc/pressure/cpu').read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return {k: float(v) for k, v in (kv.split('=') for kv in first.split()[1:])}


def _cpu_stall_us() -> Optional[int]:
    psi = _psi_cpu_some()
    return None if psi is None else int(psi['total'])


def cpu_pressure() -> Optional[float]:
    """Linux PSI ``some avg10`` for the CPU (% of time something waited for a CPU), if available."""
    psi = _psi_cpu_some()
    return None if psi is None else psi['avg10']


def wait_for_quiet_cpu(max_pressure: float, max_wait_s: float) -> Optional[float]:
    """Wait (up to ``max_wait_s``) until CPU pressure ``avg10`` drops to ``max_pressure`` % or below.

    Other work on a shared machine stalls multi-threaded ops badly; returns the pressure seen last.
    """
    deadline = time.monotonic() + max_wait_s
    pressure = cpu_pressure()
    while pressure is not None and pressure > max_pressure and time.monotonic() < deadline:
        time.sleep(2)
        pressure = cpu_pressure()
    return pressure


def tree_rss_mib() -> float:
    """Resident memory of this process and all its children (vLLM's engine core is one), in MiB."""
    import psutil
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total / 2**20


def count_mismatches(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[int, Optional[int]]:
    """How many requests differ, and the first differing token position of the first such request."""
    mismatches, first = 0, None
    for x, y in zip(a, b, strict=True):
        if list(x) != list(y):
            mismatches += 1
            if first is None:
                first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    return mismatches, first


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 2 decimals (use strings for anything else)."""
    cells = [[f'{v:.2f}' if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = '  '.join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, '  '.join('-' * w for w in widths)]
    out += ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return '\n'.join(out)


def git_revision(repo: Path) -> str:
    """``HEAD``'s short hash, with ``+dirty`` when tracked files differ from it."""
    import subprocess

    def git(*args: str) -> str:
        command = ['git', '-C', str(repo), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()

    head = git('rev-parse', '--short', 'HEAD') or 'unknown'
    return head + ('+dirty' if git('status', '--porcelain', '--untracked-files=no') else '')


def machine_info() -> dict[str, Any]:
    import os
    import platform

    import torch
    import transformers

    return {'python': platform.python_version(), 'torch': torch.__version__, 'transformers': transformers.__version__,
            'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'git': git_revision(Path(__file__).resolve().parent.parent)}


def benchmark_parser(doc: Optional[str], json_default: Optional[Path] = None) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its module docstring as the description, and ``--json`` (see
    :func:`save_results`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', type=Path, default=json_default, help='also write the figures here')
    return parser


def save_results(args: argparse.Namespace, **payload: Any) -> None:
    """Write the machine, the arguments and ``payload`` to ``args.json`` (when given)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, {'machine': machine_info(), 'args': vars(args), **payload})


def write_json(path: Path, payload: Any) -> None:
    def default(obj: Any) -> Any:
        if hasattr(obj, '__dataclass_fields__'):
            return asdict(obj)
        return str(obj)

    path.write_text(json.dumps(payload, indent=2, default=default) + '\n')


def iter_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
