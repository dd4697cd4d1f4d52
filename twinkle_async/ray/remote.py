"""``remote_class`` / ``remote_function``: a user's own class (an environment pool, a reward model) run as one Ray
actor per replica of a device group, as Twinkle's decorators run its components::

    @remote_class()
    class RewardPool:
        def __init__(self, scale: float, device_mesh: Optional[DeviceMesh] = None) -> None: ...

        @remote_function(dispatch='slice_dp', collect='flatten')
        def score(self, texts: list[str]) -> list[float]: ...

    initialize('ray', groups=[DeviceGroup(name='rewards', ranks=2, device_type='cpu')])
    pool = RewardPool(2.0, remote_group='rewards', device_mesh=DeviceMesh.from_sizes(dp_size=2))
    pool.score(texts)  # half of the list to each actor, the results joined in order

Without ``remote_group`` the class is built and called in this process, unchanged. With it, ``device_mesh.dp_size``
actors (default: one per worker of the group) each build the class with the same arguments (``device_mesh``
included when ``__init__`` takes it), in worker bundle ``i`` of the group; methods marked with ``remote_function``
dispatch their arguments and collect the results (``twinkle_async.ray.dispatch``); ``execute='first'`` calls
replica 0 only. An exception raised inside an actor reaches the caller as itself (its own type). Other methods of a
remote instance are not available (it holds no local object): a ``NotSupportedError`` says so. Ray's workers
must be able to import the class (a script's own classes travel by value; see ``ray.cloudpickle.
register_pickle_by_value`` for others). The samplers'
own remote path is :class:`~twinkle_async.sampler.AsyncSampler` with ``remote_group``, not these decorators.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, TypeVar

from twinkle_async.errors import ConfigurationError, NotSupportedError
from twinkle_async.mesh import DeviceMesh
from twinkle_async.ray.dispatch import Collect, Dispatch, check_collect, check_dispatch, collect_results, dispatch_args

__all__ = ['remote_class', 'remote_function', 'RemoteCall']

C = TypeVar('C', bound=type)
F = TypeVar('F', bound=Callable[..., Any])
Execute = Literal['all', 'first']
_ACTORS = '_twinkle_actors'


@dataclass(frozen=True)
class RemoteCall:
    """How a ``remote_function`` method runs on the replicas."""

    dispatch: Dispatch = 'slice'
    collect: Collect = 'none'
    execute: Execute = 'all'
    timeout: Optional[float] = None


@dataclass(frozen=True)
class _Replicas:
    actors: list[Any]
    mesh: DeviceMesh


def remote_function(dispatch: Dispatch = 'slice', collect: Collect = 'none', execute: Execute = 'all',
                    timeout: Optional[float] = None, lazy_collect: Optional[bool] = None,
                    sync: bool = False) -> Callable[[F], F]:
    """Mark a method of a ``remote_class`` to run on its replicas (see the module docstring); locally it runs as is.
    ``timeout``: seconds to wait for the replicas (then ``TimeoutError``). Twinkle's ``lazy_collect`` and ``sync``
    are accepted: results are always collected in the caller, at once.

    Raises:
        ConfigurationError: an unknown dispatch, collect or execute.
    """
    check_dispatch(dispatch)
    check_collect(collect)
    if execute not in ('all', 'first'):
        raise ConfigurationError(f"execute must be 'all' or 'first', got {execute!r}")

    def mark(method: F) -> F:
        method._twinkle_remote = RemoteCall(dispatch, collect, execute, timeout)  # type: ignore[attr-defined]
        return method

    return mark


def remote_class(execute: Execute = 'all') -> Callable[[C], C]:
    """Let a class be built with ``remote_group=`` (and ``device_mesh=``) as Ray actors; see the module docstring.
    ``execute='first'`` builds one actor only (replica 0), whatever the mesh."""
    if execute not in ('all', 'first'):
        raise ConfigurationError(f"execute must be 'all' or 'first', got {execute!r}")

    def decorate(cls: C) -> C:
        init: Callable[..., None] = cls.__init__  # type: ignore[misc]
        takes_mesh = 'device_mesh' in inspect.signature(init).parameters

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, remote_group: Optional[str] = None, **kwargs: Any) -> None:
            if not takes_mesh:
                kwargs.pop('device_mesh', None)
            if remote_group is None:
                init(self, *args, **kwargs)
                return
            replicas = _launch(cls, remote_group, args, kwargs, takes_mesh, execute)
            object.__setattr__(self, _ACTORS, replicas)

        cls.__init__ = __init__  # type: ignore[misc]
        for name, member in list(vars(cls).items()):
            if callable(member) and not name.startswith('__'):
                setattr(cls, name, _remote_method(name, member))
        return cls

    return decorate


def _remote_method(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    call: Optional[RemoteCall] = getattr(method, '_twinkle_remote', None)

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        replicas = self.__dict__.get(_ACTORS)
        if replicas is None:
            return method(self, *args, **kwargs)
        if call is None:
            raise NotSupportedError(f'{type(self).__name__}.{name} is not a remote_function: a remote instance runs '
                                    'only the methods marked with @remote_function')
        return _call(replicas, name, call, args, kwargs)

    return run


def _launch(cls: type, group_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], takes_mesh: bool,
            execute: Execute) -> _Replicas:
    import ray

    from twinkle_async.ray.cluster import reserved_group

    group = reserved_group(group_name)
    mesh = kwargs.get('device_mesh') or DeviceMesh(dp_size=group.workers)
    if mesh.dp_size > group.workers:
        raise ConfigurationError(f'device_mesh.dp_size={mesh.dp_size} is over the {group.workers} workers of group '
                                 f'{group_name!r}')
    if takes_mesh:
        kwargs = {**kwargs, 'device_mesh': mesh}
    host: Any = ray.remote(_Host)
    replicas = 1 if execute == 'first' else mesh.dp_size
    actors = [host.options(**group.actor_options(i)).remote(cls, args, kwargs) for i in range(replicas)]
    _get(ray, [actor.ready.remote() for actor in actors])
    return _Replicas(actors, mesh)


def _call(replicas: _Replicas, name: str, call: RemoteCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import ray

    targets = replicas.actors[:1] if call.execute == 'first' else replicas.actors
    parts = dispatch_args(call.dispatch, len(targets), args, kwargs, replicas.mesh)
    results = _get(ray, [actor.call.remote(name, a, k) for actor, (a, k) in zip(targets, parts)], call.timeout)
    return collect_results(call.collect, results, replicas.mesh)


def _get(ray: Any, refs: list[Any], timeout: Optional[float] = None) -> list[Any]:
    """``ray.get``, with an exception raised in an actor re-raised as itself.

    Raises:
        TimeoutError: the replicas did not answer within ``timeout`` seconds.
    """
    from ray.exceptions import GetTimeoutError, RayTaskError

    try:
        return list(ray.get(refs, timeout=timeout))
    except GetTimeoutError as exc:
        raise TimeoutError(f'the replicas did not answer within {timeout} s') from exc
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, BaseException):
            raise cause from exc
        raise


class _Host:
    """One replica: the user's class built from its arguments, its methods called by name."""

    def __init__(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.instance = cls(*args, **kwargs)

    def ready(self) -> bool:
        return True

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return getattr(self.instance, name)(*args, **kwargs)
