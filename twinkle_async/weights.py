"""Pure helpers for ``update_weights``: named-tensor payloads, checks against the model, buckets, versions."""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, TypeVar, Union

import torch

from twinkle_async.errors import TwinkleAsyncError, WeightUpdateError

T = TypeVar('T')

__all__ = ['NamedTensors', 'TensorSpec', 'named_tensors', 'conform', 'conformed', 'buckets', 'next_version',
           'checkpoint_specs', 'stage_update', 'DEFAULT_BUCKET_BYTES']

NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
DEFAULT_BUCKET_BYTES = 256 * 2**20

_SAFETENSORS_DTYPES = {'F32': torch.float32, 'BF16': torch.bfloat16, 'F16': torch.float16, 'F64': torch.float64}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a weight of the served model looks like."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def named_tensors(weights: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a mapping or an iterable of pairs (consumed lazily)."""
    pairs = weights.items() if isinstance(weights, Mapping) else weights
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise WeightUpdateError(f'update_weights takes a mapping or (name, tensor) pairs, got {pair!r:.80}')
        yield pair


def conform(name: str, tensor: object, specs: Mapping[str, TensorSpec], what: str = 'the model') -> torch.Tensor:
    """``tensor`` checked against ``specs[name]`` and cast to its floating dtype (a view when it already fits).

    Raises:
        WeightUpdateError: unknown name, not a tensor, wrong shape, or a non-floating dtype.
    """
    spec = specs.get(name) if isinstance(name, str) else None
    if spec is None:
        raise WeightUpdateError(f'{name!r} is not a weight of {what}{_close_names(name, specs)}')
    if not isinstance(tensor, torch.Tensor):
        raise WeightUpdateError(f'{name!r}: expected a torch.Tensor, got {type(tensor).__name__}')
    if tuple(tensor.shape) != spec.shape:
        raise WeightUpdateError(f'{name!r}: shape {tuple(tensor.shape)} does not match the model\'s {spec.shape}')
    if not tensor.dtype.is_floating_point:
        raise WeightUpdateError(f'{name!r}: dtype {tensor.dtype} is not a floating-point type '
                                f'(the model holds {spec.dtype})')
    return tensor.detach().to(dtype=spec.dtype)


def conformed(weights: NamedTensors, specs: Mapping[str, TensorSpec],
              what: str = 'the model') -> Iterator[tuple[str, torch.Tensor]]:
    """Every ``(name, tensor)`` of ``weights``, checked and cast by :func:`conform` as it is read."""
    for name, tensor in named_tensors(weights):
        yield name, conform(name, tensor, specs, what)


def buckets(pairs: Iterable[tuple[str, torch.Tensor]], limit_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group pairs into dicts of at most ``limit_bytes`` (a larger single tensor gets a bucket of its own)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += nbytes
    if bucket:
        yield bucket


def next_version(current: int, requested: Optional[int]) -> int:
    """The version an update gets: ``requested``, or one more than ``current``.

    Raises:
        WeightUpdateError: ``requested`` is not an int.
    """
    if requested is None:
        return current + 1
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise WeightUpdateError(f'version must be an int, got {requested!r}')
    return requested


async def stage_update(stage: Callable[[], T]) -> T:
    """Run ``stage`` (which consumes the caller's weights) in a worker thread.

    Raises:
        WeightUpdateError: the weights were bad, or their source raised (chained); nothing was applied.
    """
    try:
        return await asyncio.to_thread(stage)
    except TwinkleAsyncError:
        raise
    except Exception as exc:
        raise WeightUpdateError(f'reading the new weights failed midway ({exc!r}); nothing was applied, '
                                'the previous weights are still served') from exc


def checkpoint_specs(model_dir: Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of every tensor in ``model_dir``'s safetensors files (headers only)."""
    specs: dict[str, TensorSpec] = {}
    for path in sorted(Path(model_dir).glob('*.safetensors')):
        with open(path, 'rb') as file:
            header = json.loads(file.read(struct.unpack('<Q', file.read(8))[0]))
        for name, entry in header.items():
            if name != '__metadata__' and entry['dtype'] in _SAFETENSORS_DTYPES:
                specs[name] = TensorSpec(tuple(entry['shape']), _SAFETENSORS_DTYPES[entry['dtype']])
    return specs


def _close_names(name: object, specs: Mapping[str, TensorSpec]) -> str:
    import difflib
    close = difflib.get_close_matches(str(name), list(specs), n=2)
    return f' (did you mean {" or ".join(map(repr, close))}?)' if close else ''
