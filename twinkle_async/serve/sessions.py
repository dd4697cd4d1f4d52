"""Per-session token-exact trajectories: what the engine was given and what it sampled, turn after turn.

A turn's prompt continues the session's current segment when the rendered conversation starts with it —
by ids, or by text (then the segment's ids are kept exactly and only the new text is tokenized: sampled
tokens are never re-tokenized). Otherwise the turn starts a new segment (``restarts`` counts them).
Sessions are held in memory, at most ``max_sessions`` (least recently used dropped first), each for
``ttl_s`` seconds after its last use.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twinkle_async.data_format.outputs import LogprobRow

__all__ = ['Segment', 'Session', 'SessionStore']


@dataclass
class Segment:
    """One token sequence: prompts and completions in order; ``loss_mask`` is 1 on sampled tokens only."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    weight_versions: list[Optional[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    def add_turn(self, prompt_ids: Sequence[int], tokens: Sequence[int], rows: Optional[Sequence[LogprobRow]],
                 versions: Optional[Sequence[int]], finish_reason: str) -> None:
        new_prompt = list(prompt_ids[len(self.token_ids):])
        self._extend(new_prompt, 0, [None] * len(new_prompt), [None] * len(new_prompt))
        logprobs: list[Optional[float]] = [row[0][1] for row in rows] if rows else [None] * len(tokens)
        stamped: list[Optional[int]] = list(versions) if versions else [None] * len(tokens)
        self._extend(list(tokens), 1, logprobs, stamped)
        self.finish_reasons.append(finish_reason)

    def as_dict(self) -> dict[str, Any]:
        return {'token_ids': self.token_ids, 'loss_mask': self.loss_mask, 'logprobs': self.logprobs,
                'weight_versions': self.weight_versions, 'finish_reasons': self.finish_reasons}

    def _extend(self, ids: list[int], mask: int, logprobs: Sequence[Optional[float]],
                versions: Sequence[Optional[int]]) -> None:
        self.token_ids += ids
        self.loss_mask += [mask] * len(ids)
        self.logprobs += logprobs
        self.weight_versions += versions


@dataclass
class Session:
    session_id: str
    segments: list[Segment] = field(default_factory=list)
    restarts: int = 0
    last_used: float = 0.0

    def prompt_for(self, rendered: list[int], decode: Callable[[Sequence[int]], str],
                   encode: Callable[[str], list[int]]) -> tuple[list[int], Segment]:
        """The ids to send for a turn rendered as ``rendered``, and the segment the turn belongs to (a new one,
        kept once the turn is recorded with :meth:`add_turn`)."""
        current = self.segments[-1] if self.segments else None
        if current is not None:
            done = current.token_ids
            if rendered[:len(done)] == done:
                return rendered, current
            done_text, text = decode(done), decode(rendered)
            if text.startswith(done_text):
                return done + encode(text[len(done_text):]), current
        return rendered, Segment()

    def add_turn(self, segment: Segment, prompt_ids: Sequence[int], tokens: Sequence[int],
                 rows: Optional[Sequence[LogprobRow]], versions: Optional[Sequence[int]], finish_reason: str) -> None:
        """Record a finished turn in ``segment`` (from :meth:`prompt_for`)."""
        if not self.segments or segment is not self.segments[-1]:
            self.restarts += bool(self.segments)
            self.segments.append(segment)
        segment.add_turn(prompt_ids, tokens, rows, versions, finish_reason)

    def as_dict(self) -> dict[str, Any]:
        return {'session_id': self.session_id, 'restarts': self.restarts,
                'segments': [segment.as_dict() for segment in self.segments]}


class SessionStore:
    """Sessions by id, bounded: at most ``max_sessions`` (LRU), each kept ``ttl_s`` seconds after its last use."""

    def __init__(self, max_sessions: int = 1024, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions, self.ttl_s, self._clock = max_sessions, ttl_s, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Optional[Session]:
        self._expire()
        return self._sessions.get(session_id)

    def get_or_create(self, session_id: str) -> Session:
        self._expire()
        session = self._sessions.pop(session_id, None) or Session(session_id)
        session.last_used = self._clock()
        self._sessions[session_id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def delete(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_used <= self.ttl_s:
                return
            self._sessions.popitem(last=False)
