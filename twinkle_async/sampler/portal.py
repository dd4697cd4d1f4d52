"""A blocking portal: one asyncio loop on a daemon thread that synchronous callers submit work to."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

from twinkle_async.errors import EngineDeadError

__all__ = ['Portal']

T = TypeVar('T')


class Portal:
    """Runs coroutines on a private event loop (daemon thread) and blocks the caller for the result."""

    def __init__(self, name: str = 'twinkle-async-portal') -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` on the portal's loop and return its result.

        Raises:
            EngineDeadError: the portal was stopped (the sampler was closed).
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError('Portal.call from the portal thread would deadlock')
        if self._loop.is_closed():
            raise EngineDeadError('the sampler was closed')
        future = asyncio.run_coroutine_threadsafe(_invoke(fn, args, kwargs), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop the work too
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Iterate an async iterator from synchronous code; closing the iterator closes ``agen``."""
        try:
            while True:
                more, item = self.call(_next, agen)
                if not more:
                    return
                yield item
        finally:
            aclose = getattr(agen, 'aclose', None)
            if aclose is not None and self._loop.is_running():
                self.call(aclose)

    def stop(self) -> None:
        """Stop the loop and join its thread (idempotent)."""
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()


async def _invoke(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    return await fn(*args, **kwargs)


async def _next(agen: AsyncIterator[T]) -> tuple[bool, Any]:
    try:
        return True, await agen.__anext__()
    except StopAsyncIteration:
        return False, None
