"""``PendingIds``: request ids an engine waits on, with a wait for given ones to be gone."""

from __future__ import annotations

import asyncio
from typing import Iterable

__all__ = ['PendingIds']


class PendingIds:
    """A set of request ids; ``gone(ids)`` waits until none of ``ids`` is in it any more."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._discarded = asyncio.Event()

    def add(self, request_id: str) -> None:
        self.ids.add(request_id)

    def discard(self, request_id: str) -> None:
        if request_id in self.ids:
            self.ids.discard(request_id)
            self._discarded.set()

    async def gone(self, ids: Iterable[str]) -> None:
        waiting = set(ids)
        while True:
            self._discarded.clear()
            if not waiting & self.ids:
                return
            await self._discarded.wait()
