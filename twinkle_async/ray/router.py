"""Which replica serves a request: least outstanding work, and sticky sessions for prefix-cache reuse."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

__all__ = ['Router']


class Router:
    """Tracks the work (samples) each replica has in flight; pure bookkeeping, no I/O."""

    def __init__(self, size: int, max_sessions: int = 100_000) -> None:
        self.outstanding = [0] * size
        self.alive = [True] * size
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self.max_sessions = max_sessions

    def pick(self, work: int, session_id: Optional[str] = None) -> int:
        """The replica for one request (its session's, while that one is alive); counts ``work`` on it."""
        replica = self.sessions.get(session_id) if session_id is not None else None
        if replica is None or not self.alive[replica]:
            replica = self._least_loaded()
        if session_id is not None:
            self.sessions[session_id] = replica
            self.sessions.move_to_end(session_id)
            if len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        self.outstanding[replica] += work
        return replica

    def done(self, replica: int, work: int) -> None:
        self.outstanding[replica] -= work

    def _least_loaded(self) -> int:
        candidates = [i for i, alive in enumerate(self.alive) if alive]
        if not candidates:
            raise LookupError('no replica is alive')
        return min(candidates, key=lambda i: self.outstanding[i])
