"""File mode of the ``twinkle-async sample`` command: a JSONL of inputs in, a JSONL of rollouts out.

Each input line is a ``Trajectory`` (``{"messages": [...], "tools": [...]}``), an ``InputFeature``
(``{"input_ids": [...]}``) or ``{"prompt": "text"}`` (one user message). Every output line holds the
input line's fields plus ``"response"`` (the ``SampleResponse``), in input order; a failed line holds
``"error"`` instead (only with ``--skip-errors``; by default the first bad line aborts the run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, Iterator, Optional, TextIO, Union

from tqdm import tqdm

from twinkle_async.data_format import SampleResponse, SamplingParams
from twinkle_async.errors import InvalidInputError, InvalidRequestError
from twinkle_async.sampler import AsyncSampler

__all__ = ['InputLine', 'LineError', 'chat_trajectory', 'parse_line', 'output_record', 'run_file']

Outcome = Union[SampleResponse, str]
"""A line's result: its response, or the error message that failed it."""

_INPUT_KINDS = ('messages', 'input_ids', 'prompt')


class LineError(InvalidInputError):
    """An input line that cannot be sampled (the message starts with its line number)."""


@dataclass(frozen=True, slots=True)
class InputLine:
    """One non-blank input line: its JSON fields and sampler input, or why it is unusable."""

    lineno: int
    fields: Optional[dict[str, Any]]
    sampler_input: Optional[dict[str, Any]] = None
    error: Optional[str] = None


@dataclass(slots=True)
class Totals:
    """Running counts for the progress bar and the final summary."""

    requests: int = 0
    samples: int = 0
    tokens: int = 0
    errors: int = 0

    def add(self, outcome: Outcome) -> None:
        if isinstance(outcome, str):
            self.errors += 1
            return
        self.requests += 1
        self.samples += len(outcome.sequences)
        self.tokens += sum(len(seq.tokens) for seq in outcome.sequences)

    def summary(self, wall_s: float) -> str:
        rate = self.tokens / wall_s if wall_s > 0 else 0.0
        text = (f'requests: {self.requests}  samples: {self.samples}  generated tokens: {self.tokens}  '
                f'wall: {wall_s:.2f} s  tokens/s: {rate:.1f}')
        return text + (f'  errors: {self.errors}' if self.errors else '')


def chat_trajectory(prompt: str, system: Optional[str] = None) -> dict[str, Any]:
    """A one-turn chat trajectory: an optional system message, then ``prompt`` as the user message."""
    messages = [{'role': 'system', 'content': system}] if system else []
    return {'messages': messages + [{'role': 'user', 'content': prompt}]}


def parse_line(text: str, lineno: int, system: Optional[str] = None) -> InputLine:
    """Parse one JSONL line; a malformed line comes back with ``error`` set (never raises).

    ``system`` is prepended as a system message to ``{"prompt": ...}`` lines only.
    """
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        return InputLine(lineno, None, error=f'line {lineno}: invalid JSON: {exc}')
    if not isinstance(fields, dict):
        return InputLine(lineno, None, error=f'line {lineno}: expected a JSON object, got {type(fields).__name__}')
    try:
        return InputLine(lineno, fields, _sampler_input(fields, system))
    except InvalidInputError as exc:
        return InputLine(lineno, fields, error=f'line {lineno}: {exc}')


def _sampler_input(fields: dict[str, Any], system: Optional[str]) -> dict[str, Any]:
    kinds = [kind for kind in _INPUT_KINDS if kind in fields]
    if len(kinds) != 1:
        found = ', '.join(kinds) if kinds else 'none'
        raise InvalidInputError(f'a line needs exactly one of "messages", "input_ids" or "prompt" (found: {found})')
    if kinds[0] == 'prompt':
        if not isinstance(fields['prompt'], str):
            raise InvalidInputError(f'"prompt" must be a string, got {type(fields["prompt"]).__name__}')
        return chat_trajectory(fields['prompt'], system)
    if kinds[0] == 'input_ids':
        return {'input_ids': fields['input_ids']}
    return {key: fields[key] for key in ('messages', 'tools') if key in fields}


def output_record(line: InputLine, outcome: Outcome) -> dict[str, Any]:
    """The output JSON object of one line: its fields plus ``response`` (or ``error``)."""
    fields = line.fields or {}
    if isinstance(outcome, str):
        return {**fields, 'error': outcome}
    return {**fields, 'response': outcome.model_dump(mode='json')}


def read_lines(path: str, system: Optional[str]) -> list[InputLine]:
    """Parse every non-blank line of ``path`` (``-`` reads stdin)."""
    with _open_input(path) as stream:
        return [parse_line(text, n, system) for n, text in enumerate(stream, 1) if text.strip()]


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[TextIO]:
    if path == '-':
        yield sys.stdin
        return
    with open(path, encoding='utf-8') as stream:
        yield stream


class _OrderedWriter:
    """Writes records in input order, holding back those that finish early."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.written = 0
        self._pending: dict[int, dict[str, Any]] = {}

    def put(self, index: int, record: dict[str, Any]) -> None:
        self._pending[index] = record
        while self.written in self._pending:
            self.stream.write(json.dumps(self._pending.pop(self.written), ensure_ascii=False) + '\n')
            self.written += 1
        self.stream.flush()


class _FileRun:
    """Samples every line with at most ``concurrency`` requests in flight."""

    def __init__(self, sampler: AsyncSampler, params: SamplingParams, concurrency: int) -> None:
        self.sampler = sampler
        self.params = params
        self.concurrency = concurrency

    async def outcomes(self, lines: list[InputLine]) -> AsyncGenerator[tuple[int, Outcome], None]:
        """Yield ``(index, outcome)`` as lines finish; closing early cancels those in flight."""
        todo = iter(enumerate(lines))
        running: set[asyncio.Task[tuple[int, Outcome]]] = set()
        try:
            while True:
                for index, line in itertools.islice(todo, self.concurrency - len(running)):
                    running.add(asyncio.create_task(self._one(index, line)))
                if not running:
                    return
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _one(self, index: int, line: InputLine) -> tuple[int, Outcome]:
        if line.error is not None:
            return index, line.error
        try:
            assert line.sampler_input is not None  # a line without an error has an input
            return index, await self.sampler.sample(line.sampler_input, self.params)
        except InvalidRequestError as exc:  # a bad input fails its line; engine failures end the run
            return index, f'line {line.lineno}: {exc}'


async def run_file(args: argparse.Namespace, params: SamplingParams, engine_args: dict[str, Any]) -> int:
    """Sample ``args.input`` into ``args.output``; returns the exit code.

    Raises:
        TwinkleAsyncError: the sampler cannot be built, or the engine failed.
    """
    problem = _path_problem(args.input, args.output, args.overwrite)
    if problem is not None:
        return _fail(problem, 2)
    try:
        lines = read_lines(args.input, args.system)
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f'cannot read {args.input}: {exc}', 1)
    bad = [line.error for line in lines if line.error is not None]
    if bad and not args.skip_errors:
        return _fail(_bad_lines_message(bad), 1)
    started = time.perf_counter()
    async with AsyncSampler(args.model, args.engine, engine_args) as sampler:
        print(f'model loaded in {time.perf_counter() - started:.1f} s; sampling {len(lines)} inputs',
              file=sys.stderr)
        with contextlib.ExitStack() as stack:
            try:
                stream = stack.enter_context(_open_output(args.output, args.overwrite))
            except OSError as exc:
                return _fail(f'cannot write {args.output}: {exc}', 2)
            return await _sample_lines(_FileRun(sampler, params, args.concurrency), lines, stream, args)


async def _sample_lines(run: _FileRun, lines: list[InputLine], stream: TextIO, args: argparse.Namespace) -> int:
    writer, totals, started = _OrderedWriter(stream), Totals(), time.perf_counter()
    with tqdm(total=len(lines), unit='req', file=sys.stderr, disable=args.no_progress) as bar:
        async with contextlib.aclosing(run.outcomes(lines)) as outcomes:
            async for index, outcome in outcomes:
                if isinstance(outcome, str) and not args.skip_errors:
                    bar.close()
                    return _fail(f'{outcome}\naborted: {writer.written} of {len(lines)} lines written to '
                                 f'{args.output} (--skip-errors writes an "error" line and goes on)', 1)
                writer.put(index, output_record(lines[index], outcome))
                totals.add(outcome)
                bar.set_postfix_str(f'{totals.tokens / (time.perf_counter() - started):.1f} tok/s', refresh=False)
                bar.update(1)
    print(totals.summary(time.perf_counter() - started), file=sys.stderr)
    return 0


def _path_problem(input_path: str, output_path: str, overwrite: bool) -> Optional[str]:
    if input_path != '-' and not Path(input_path).is_file():
        return f'input file {input_path} does not exist'
    if output_path == '-':
        return None
    if input_path != '-' and Path(output_path).resolve() == Path(input_path).resolve():
        return f'--output {output_path} is the input file'
    if os.path.lexists(output_path) and not overwrite:  # lexists: a dangling symlink counts as a file
        return f'output file {output_path} already exists (pass --overwrite to replace it)'
    if not Path(output_path).resolve().parent.is_dir():
        return f'the folder of --output {output_path} does not exist'
    return None


@contextlib.contextmanager
def _open_output(path: str, overwrite: bool) -> Iterator[TextIO]:
    """Write into a temporary file next to ``path``, published when the block ends without an exception.

    An existing file is only ever replaced whole (``--overwrite``), never emptied first: a run that crashes
    leaves it as it was. Without ``overwrite`` the file is published with a hard link, which fails rather than
    replace a file that appeared meanwhile.
    """
    if path == '-':
        yield sys.stdout
        return
    target = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.partial', dir=target.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(descriptor, 'w', encoding='utf-8') as stream:
            yield stream
        if overwrite:
            os.replace(temporary, target)
        else:
            os.link(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _bad_lines_message(errors: list[str], shown: int = 10) -> str:
    more = f'\n... and {len(errors) - shown} more bad lines' if len(errors) > shown else ''
    return '\n'.join(errors[:shown]) + more + '\naborted before sampling (--skip-errors writes an "error" line ' \
        'for each and samples the rest)'


def _fail(message: str, code: int) -> int:
    print(f'error: {message}', file=sys.stderr)
    return code
