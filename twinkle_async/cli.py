"""The ``twinkle-async`` command line.

``twinkle-async sample "prompt"`` streams one reply to stdout;
``twinkle-async sample --input prompts.jsonl --output rollouts.jsonl`` samples a JSONL file
(see :mod:`twinkle_async.cli_jsonl`). Sampling flags mirror ``SamplingParams``; only the flags given
are passed, so its defaults apply (except ``--max-tokens``, 256 for a single prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import typing
from typing import Any, Optional, Sequence, TextIO

from twinkle_async.cli_jsonl import chat_trajectory, run_file
from twinkle_async.data_format import SamplingParams, TokenDelta
from twinkle_async.errors import TwinkleAsyncError
from twinkle_async.models import DEFAULT_MODEL
from twinkle_async.sampler import AsyncSampler

__all__ = ['main', 'build_parser', 'sampling_overrides', 'engine_args_from', 'parse_engine_arg']

PROMPT_MAX_TOKENS = 256
"""``--max-tokens`` when sampling a single prompt and the flag is not given."""

_SAMPLING_FLAGS = tuple(SamplingParams.model_fields)
_ENGINE_SHORTCUTS = ('dtype', 'max_model_len', 'max_num_seqs')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 sampling error, 2 usage error, 130 Ctrl-C).

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when ``None``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == 'sample':
            _check_mode(parser, args)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _sample(args) if args.command == 'sample' else _serve(args)
    except TwinkleAsyncError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('\nerror: interrupted', file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The ``twinkle-async`` argument parser (subcommands ``sample`` and ``serve``)."""
    parser = argparse.ArgumentParser(prog='twinkle-async', description='Sample rollouts from an LLM.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    sample = commands.add_parser('sample', help='sample one prompt (streamed) or a JSONL file of inputs',
                                 description='Stream a reply to PROMPT, or sample every line of --input.')
    sample.add_argument('prompt', nargs='?', help='a user message to answer ("-" reads it from stdin)')
    sample.add_argument('--system', help='a system message before PROMPT (and before "prompt" lines of --input)')
    _add_file_flags(sample.add_argument_group('file mode'))
    _add_sampling_flags(sample.add_argument_group('sampling (SamplingParams; defaults apply when not given)'))
    _add_engine_flags(sample.add_argument_group('model and engine'))
    serve = commands.add_parser('serve', help='an OpenAI-compatible server with token-exact sessions',
                                description='Serve the model over OpenAI\'s HTTP API (/v1/chat/completions, '
                                '/v1/completions, /v1/models, /health, /v1/sessions/{id}/trajectory).')
    serve.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    serve.add_argument('--port', type=int, default=8000, help='port (0: any free one; the URL is printed)')
    serve.add_argument('--api-key', help='require "Authorization: Bearer KEY" (also $TWINKLE_ASYNC_API_KEY)')
    serve.add_argument('--ray', action='store_true', help='run the engine(s) as Ray actors (local Ray or $RAY_ADDRESS)')
    serve.add_argument('--dp', type=_positive_int, default=1, help='data-parallel replicas (needs --ray); a session '
                       'stays on one replica')
    _add_engine_flags(serve.add_argument_group('model and engine'))
    return parser


def _add_file_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--input', '-i', metavar='JSONL',
                       help='one input per line: {"messages": [...]}, {"input_ids": [...]} or {"prompt": "..."}')
    group.add_argument('--output', '-o', metavar='JSONL', help='rollouts, one line per input, in input order')
    group.add_argument('--overwrite', action='store_true', help='replace an existing --output file')
    group.add_argument('--concurrency', type=_positive_int, default=64, help='inputs in flight (default 64)')
    group.add_argument('--skip-errors', action='store_true',
                       help='write {"error": ...} for a bad line and go on (default: abort with exit code 1)')
    group.add_argument('--no-progress', action='store_true', help='no progress bar')


def _add_sampling_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per ``SamplingParams`` field, its help the field's description."""
    for name, field in SamplingParams.model_fields.items():
        flags = ['--' + name.replace('_', '-'), *(['-n'] if name == 'num_samples' else [])]
        help_text = field.description
        if name == 'max_tokens':
            help_text = f'{help_text} (single prompt: {PROMPT_MAX_TOKENS})'
        if name == 'stop':
            group.add_argument(*flags, action='append', metavar='STRING', help='a stop string (repeatable)')
        elif field.annotation is bool:
            group.add_argument(*flags, action='store_true', default=None, help=help_text)
        else:
            group.add_argument(*flags, type=_number_type(field.annotation), help=help_text)


def _number_type(annotation: Any) -> type:
    """``int`` or ``float`` out of ``int``, ``float`` or ``int | None``."""
    return next(t for t in (int, float) if annotation is t or t in typing.get_args(annotation))


def _add_engine_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument('--model', '-m', default=DEFAULT_MODEL, help=f'model id or HF directory ({DEFAULT_MODEL})')
    group.add_argument('--engine', choices=('torch', 'vllm'), default='torch')
    group.add_argument('--engine-arg', action='append', type=parse_engine_arg, default=[], metavar='KEY=VALUE',
                       help='an engine_args entry; VALUE is parsed as JSON, else kept as a string (repeatable)')
    group.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16', 'auto'))
    group.add_argument('--max-model-len', type=_positive_int)
    group.add_argument('--max-num-seqs', type=_positive_int)


def _check_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.input is None):
        parser.error('give either a PROMPT or --input JSONL')
    if args.input is not None and args.output is None:
        parser.error('--input needs --output (a JSONL file, or "-" for stdout)')
    if args.input is None and (args.output is not None or args.overwrite or args.skip_errors):
        parser.error('--output, --overwrite and --skip-errors need --input')


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SamplingParams`` fields the user set (plus the single-prompt ``max_tokens`` default)."""
    fields = {name: getattr(args, name) for name in _SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.input is None:
        fields.setdefault('max_tokens', PROMPT_MAX_TOKENS)
    return fields


def engine_args_from(args: argparse.Namespace) -> dict[str, Any]:
    """``engine_args`` from ``--engine-arg`` entries, then the ``--dtype``-style shortcuts."""
    engine_args = dict(args.engine_arg)
    engine_args.update({name: getattr(args, name) for name in _ENGINE_SHORTCUTS if getattr(args, name) is not None})
    return engine_args


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; VALUE is JSON when it parses (``8``, ``true``), else a string.

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition('=')
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace('-', '_'), value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _sample(args: argparse.Namespace) -> int:
    params = SamplingParams(**sampling_overrides(args))  # validated before the model loads
    engine_args = engine_args_from(args)
    _quiet_transformers()
    if args.input is not None:
        return asyncio.run(run_file(args, params, engine_args))
    prompt = sys.stdin.read() if args.prompt == '-' else args.prompt
    return asyncio.run(_stream_prompt(args, chat_trajectory(prompt, args.system), params, engine_args))


def _serve(args: argparse.Namespace) -> int:
    from twinkle_async.serve.server import serve

    if args.dp > 1 and not args.ray:
        print('error: --dp needs --ray (replicas run as Ray actors)', file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get('TWINKLE_ASYNC_API_KEY')
    _quiet_transformers()
    replicas = args.dp if args.ray else None
    asyncio.run(serve(args.model, args.engine, engine_args_from(args), args.host, args.port, api_key, replicas))
    return 0


def _quiet_transformers() -> None:
    # transformers' "Loading weights" bar (and vLLM's INFO log, on stdout) would clutter the streamed reply
    os.environ.setdefault('VLLM_LOGGING_LEVEL', 'ERROR')
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


async def _stream_prompt(args: argparse.Namespace, trajectory: dict[str, Any], params: SamplingParams,
                         engine_args: dict[str, Any]) -> int:
    async with AsyncSampler(args.model, args.engine, engine_args) as sampler:
        printer = _StreamPrinter(params.num_samples, sys.stdout)
        async for delta in sampler.stream(trajectory, params):
            printer.add(delta)
        printer.finish()
    return 0


class _StreamPrinter:
    """Prints samples one after another: the current one live, later ones held until their turn."""

    def __init__(self, num_samples: int, out: TextIO) -> None:
        self.out = out
        self.texts: list[list[str]] = [[] for _ in range(num_samples)]
        self.done = [False] * num_samples
        self.current = 0
        self._headed = -1  # the last sample whose header is printed

    def add(self, delta: TokenDelta) -> None:
        self.texts[delta.index].append(delta.text)
        self.done[delta.index] = self.done[delta.index] or delta.finish_reason is not None
        self._drain()

    def finish(self) -> None:
        """Print whatever is left (samples that ended without a finish reason)."""
        self.done = [True] * len(self.done)
        self._drain()

    def _drain(self) -> None:
        while self.current < len(self.texts) and (self.texts[self.current] or self.done[self.current]):
            if len(self.texts) > 1 and self._headed < self.current:
                self.out.write(f'--- sample {self.current} ---\n')
                self._headed = self.current
            self.out.write(''.join(self.texts[self.current]))
            self.texts[self.current].clear()
            if not self.done[self.current]:
                break
            self.out.write('\n')
            self.current += 1
        self.out.flush()
