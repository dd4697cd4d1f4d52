"""Pure argument dispatch and result collection for ``remote_function`` (Twinkle's names and meanings).

Dispatch (how a call's arguments reach ``n`` replicas):

- ``'all'``: every replica gets every argument.
- ``'slice'``: each ``list`` argument is cut into ``n`` contiguous parts of near-equal length (the first ones one
  longer), replica ``i`` gets part ``i``; other arguments go to every replica.
- ``'slice_dp'``: like ``'slice'``, also for tuples, tensors and arrays (along the first axis) and, key by key,
  dicts; refused when the batch is smaller than the replicas (a replica without data).
- a callable ``(n, i, args, kwargs, device_mesh=...) -> (args, kwargs)`` (Twinkle's signature).

Collect (how the replicas' results, in replica order, become one): ``'none'`` (the list; one replica's result
unwrapped), ``'flatten'`` (the lists joined in order), ``'first'``, ``'mean'``, ``'sum'``, or a callable
``(results, device_mesh=...) -> result``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence, Union

from twinkle_async.errors import ConfigurationError, InvalidRequestError

__all__ = ['Dispatch', 'Collect', 'dispatch_args', 'collect_results', 'check_dispatch', 'check_collect']

Dispatch = Union[Literal['all', 'slice', 'slice_dp'], Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]]
Collect = Union[Literal['none', 'flatten', 'first', 'mean', 'sum'], Callable[..., Any]]
_DISPATCH = ('all', 'slice', 'slice_dp')
_COLLECT = ('none', 'flatten', 'first', 'mean', 'sum')


def check_dispatch(dispatch: Any) -> None:
    """Raises ConfigurationError for an unknown dispatch."""
    if not callable(dispatch) and dispatch not in _DISPATCH:
        raise ConfigurationError(f'dispatch must be one of {_DISPATCH} or a callable, got {dispatch!r}')


def check_collect(collect: Any) -> None:
    """Raises ConfigurationError for an unknown collect."""
    if not callable(collect) and collect not in _COLLECT:
        raise ConfigurationError(f'collect must be one of {_COLLECT} or a callable, got {collect!r}')


def dispatch_args(dispatch: Dispatch, n: int, args: Sequence[Any], kwargs: dict[str, Any],
                  device_mesh: Any = None) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each of ``n`` replicas' ``(args, kwargs)``.

    Raises:
        InvalidRequestError: ``'slice_dp'`` with fewer items than replicas.
    """
    if callable(dispatch):
        return [dispatch(n, i, tuple(args), dict(kwargs), device_mesh=device_mesh) for i in range(n)]
    if dispatch == 'all':
        return [(tuple(args), dict(kwargs)) for _ in range(n)]
    cut = _cut_list if dispatch == 'slice' else _cut_batch
    parts = [cut(arg, n) for arg in args]
    named = {key: cut(value, n) for key, value in kwargs.items()}
    return [(tuple(p[i] for p in parts), {key: value[i] for key, value in named.items()}) for i in range(n)]


def collect_results(collect: Collect, results: list[Any], device_mesh: Any = None) -> Any:
    """The replicas' results (in replica order) as one."""
    if callable(collect):
        return collect(results, device_mesh=device_mesh)
    if collect == 'none':
        return results[0] if len(results) == 1 else results
    if collect == 'first':
        return results[0]
    if collect == 'flatten':
        return [item for result in results for item in result]
    if collect == 'sum':
        return sum(results)
    return sum(results) / len(results)


def _bounds(length: int, n: int) -> list[tuple[int, int]]:
    size, extra = divmod(length, n)
    return [(i * size + min(i, extra), (i + 1) * size + min(i + 1, extra)) for i in range(n)]


def _cut_list(value: Any, n: int) -> list[Any]:
    if not isinstance(value, list):
        return [value] * n
    return [value[start:end] for start, end in _bounds(len(value), n)]


def _cut_batch(value: Any, n: int) -> list[Any]:
    if isinstance(value, dict):
        per_key = {key: _cut_batch(item, n) for key, item in value.items()}
        return [{key: parts[i] for key, parts in per_key.items()} for i in range(n)]
    if not isinstance(value, (list, tuple)) and not (hasattr(value, 'shape') and getattr(value, 'ndim', 0) > 0):
        return [value] * n
    if len(value) < n:
        raise InvalidRequestError(f"dispatch='slice_dp': a batch of {len(value)} for {n} replicas leaves a replica "
                                  f'without data; send at least {n}')
    return [value[start:end] for start, end in _bounds(len(value), n)]
