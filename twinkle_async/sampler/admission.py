"""Request admission: the requests in flight (bounded), their adapters, per-request timeouts (engine-agnostic)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator, Optional

from twinkle_async.engines.base import EngineRequest
from twinkle_async.errors import InvalidRequestError, OverloadedError

__all__ = ['Admission']


class Admission:
    """Counts requests in flight; past ``max_pending`` new ones get :class:`OverloadedError` at once.

    A request with a ``timeout`` is aborted in the engine when it runs out: it ends like any aborted
    request, with its partial tokens and stop reason 'abort' (no exception).
    """

    def __init__(self, max_pending: Optional[int] = None) -> None:
        if max_pending is not None and (isinstance(max_pending, bool) or not isinstance(max_pending, int)
                                        or max_pending < 1):
            raise InvalidRequestError(f'max_pending_requests must be a positive int or None, got {max_pending!r}')
        self.max_pending = max_pending
        self.adapter_of: dict[str, str] = {}  # request id -> adapter, for requests in flight
        self._aborts: set[asyncio.Task[Any]] = set()

    @property
    def pending(self) -> int:
        return len(self.adapter_of)

    def using(self, adapter: str) -> list[str]:
        """Ids of the requests in flight that sample with ``adapter``."""
        return [request_id for request_id, name in self.adapter_of.items() if name == adapter]

    @contextlib.contextmanager
    def admit(self, engine: Any, request: EngineRequest, timeout: Optional[float]) -> Iterator[None]:
        """Hold a place for one request while the block runs.

        Raises:
            OverloadedError: ``max_pending`` requests are in flight already.
            InvalidRequestError: ``timeout`` is not a positive number.
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise InvalidRequestError(f'timeout must be a positive number of seconds, got {timeout!r}')
        if self.max_pending is not None and self.pending >= self.max_pending:
            raise OverloadedError(f'{self.pending} requests are in flight, the limit max_pending_requests='
                                  f'{self.max_pending}; retry later')
        self.adapter_of[request.request_id] = request.adapter_name
        timer = None if timeout is None else asyncio.get_running_loop().call_later(
            timeout, self._abort, engine, request.request_id)
        try:
            yield
        finally:
            del self.adapter_of[request.request_id]
            if timer is not None:
                timer.cancel()

    def _abort(self, engine: Any, request_id: str) -> None:
        task = asyncio.ensure_future(engine.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
