"""Per-request output collector: the engine's output handler puts, the request's consumer gets."""

from __future__ import annotations

import asyncio
from typing import Optional

from twinkle_async.engines.base import EngineOutput

__all__ = ['RequestCollector']


class RequestCollector:
    """Buffers outputs so a lagging consumer takes everything pending in one ``get``."""

    __slots__ = ('_pending', '_ready', '_error', '_unfinished')

    def __init__(self, num_samples: int) -> None:
        self._pending: list[EngineOutput] = []
        self._ready = asyncio.Event()
        self._error: Optional[BaseException] = None
        self._unfinished = num_samples

    @property
    def finished(self) -> bool:
        """Every sample's last output was handed to the consumer."""
        return self._unfinished == 0

    def put(self, output: EngineOutput) -> None:
        self._pending.append(output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> list[EngineOutput]:
        """Everything received since the last call (waits for at least one output)."""
        if not self._pending and self._error is None:
            await self._ready.wait()
        self._ready.clear()
        if self._error is not None and not self._pending:
            raise self._error
        outputs, self._pending = self._pending, []
        self._unfinished -= sum(1 for o in outputs if o.finish_reason is not None)
        return outputs
