"""Per-request output collector: the engine's output handler puts, the request's consumer gets."""

from __future__ import annotations

import asyncio
from typing import Generic, Optional, TypeVar

__all__ = ['OutputCollector']

T = TypeVar('T')


class OutputCollector(Generic[T]):
    """Buffers one request's outputs so a lagging consumer takes everything pending in one ``get``; after
    ``fail`` the consumer gets what was pending, then the error."""

    __slots__ = ('_pending', '_ready', '_error')

    def __init__(self) -> None:
        self._pending: list[T] = []
        self._ready = asyncio.Event()
        self._error: Optional[BaseException] = None

    def put(self, output: T) -> None:
        self._pending.append(output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> list[T]:
        """Everything received since the last call (waits for at least one output)."""
        while not self._pending and self._error is None:
            await self._ready.wait()
        self._ready.clear()
        if not self._pending:
            assert self._error is not None
            raise self._error
        outputs, self._pending = self._pending, []
        return outputs
