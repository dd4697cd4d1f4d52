"""Request admission: a bound on requests in flight, and per-request timeouts (engine-agnostic)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Iterator, Optional

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
        self.pending = 0
        self._aborts: set[asyncio.Task[Any]] = set()

    @contextlib.contextmanager
    def admit(self, engine: Any, request_id: str, timeout: Optional[float]) -> Iterator[None]:
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
        self.pending += 1
        timer = None if timeout is None else asyncio.get_running_loop().call_later(
            timeout, self._abort, engine, request_id)
        try:
            yield
        finally:
            self.pending -= 1
            if timer is not None:
                timer.cancel()

    def _abort(self, engine: Any, request_id: str) -> None:
        task = asyncio.ensure_future(engine.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
