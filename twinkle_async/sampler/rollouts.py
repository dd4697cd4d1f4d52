"""What the sampler knows about the rollouts it is collecting: the weight versions in flight, the staleness bound
(``max_staleness``), and the counters it exposes (``AsyncSampler.metrics()``, the gateway's ``/metrics``).

Staleness of a token = the version current when its response is returned minus the version that sampled it. With
``max_staleness=k`` no returned token is more than ``k`` versions stale: a request does not start while a request
in flight holds tokens more than ``k`` versions behind the newest committed version; after each commit, requests
holding such tokens are aborted — a ``sample`` call samples them again from the start (``restarted``), a stream
ends with stop reason 'abort' (``dropped``: its tokens were yielded already) — and a response that would still
come back too stale (its tokens raced the commit) is sampled again before it is returned.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from twinkle_async.errors import InvalidRequestError

__all__ = ['Rollouts', 'RolloutMetrics']


@dataclass
class RolloutMetrics:
    """Counters since the sampler started (samples, unless said).

    ``generated_tokens``: tokens the engine produced for this sampler, those of aborted and restarted samples
    included. ``returned_tokens`` / ``max_staleness_returned`` / ``staleness_sum``: the tokens returned (``sample``
    responses and stream deltas) and their staleness (max, sum). ``restarted``: samples sampled again for the
    staleness bound; ``dropped``: streamed samples ended by it; ``aborted_groups`` / ``rejected_groups``:
    ``sample_groups``' groups cut short once it had its target / refused by ``accept``. ``metrics()`` adds
    ``versions_in_flight``: requests in flight by the oldest weight version among their tokens.
    """

    generated_tokens: int = 0
    returned_tokens: int = 0
    staleness_sum: int = 0
    max_staleness_returned: int = 0
    restarted: int = 0
    dropped: int = 0
    aborted_groups: int = 0
    rejected_groups: int = 0


class Rollouts:
    """Per request in flight, the oldest weight version among its tokens; the staleness bound over them."""

    def __init__(self, max_staleness: Optional[int]) -> None:
        if max_staleness is not None and (isinstance(max_staleness, bool) or not isinstance(max_staleness, int)
                                          or max_staleness < 0):
            raise InvalidRequestError(f'max_staleness must be an int >= 0 or None, got {max_staleness!r}')
        self.max_staleness = max_staleness
        self.oldest: dict[str, int] = {}  # request id -> oldest version among its tokens so far
        self.marked: set[str] = set()  # aborted for the bound: to be sampled again (or dropped, streams)
        self.counts = RolloutMetrics()
        self._changed = asyncio.Condition()

    def observe(self, request_id: str, tokens: int, version: int) -> None:
        """``tokens`` new tokens of ``request_id`` sampled by ``version``."""
        self.counts.generated_tokens += tokens
        if tokens and version < self.oldest.get(request_id, version + 1):
            self.oldest[request_id] = version

    async def release(self, request_id: str) -> None:
        self.oldest.pop(request_id, None)
        if self.max_staleness is not None:  # requests may be waiting to start
            async with self._changed:
                self._changed.notify_all()

    def too_stale(self, oldest_version: int, newest: int) -> bool:
        return self.max_staleness is not None and newest - oldest_version > self.max_staleness

    async def wait_to_start(self, newest: Callable[[], int]) -> None:
        """Return once no request in flight holds tokens more than ``max_staleness`` behind ``newest()``."""
        if self.max_staleness is None:
            return
        async with self._changed:
            await self._changed.wait_for(lambda: not any(self.too_stale(v, newest()) for v in self.oldest.values()))

    def sample_again(self, request_id: str, versions: list[list[int]], newest: int) -> bool:
        """Whether a finished request (``versions``: per sample, per token) must be sampled again for the bound
        (counted): it was aborted for it, or a token would be returned too stale."""
        again = request_id in self.marked or any(self.too_stale(v, newest) for sample in versions for v in sample)
        self.marked.discard(request_id)
        if again:
            self.counts.restarted += len(versions)
        return again

    def stream_ended(self, request_id: str, samples: int) -> None:
        """A stream's request ended: if the bound aborted it, its ``samples`` count as dropped."""
        if request_id in self.marked:
            self.marked.discard(request_id)
            self.counts.dropped += samples

    def stale_requests(self, newest: int) -> list[str]:
        """Requests in flight with tokens too stale for ``newest`` (marked: their callers sample them again)."""
        stale = [request_id for request_id, version in self.oldest.items() if self.too_stale(version, newest)]
        self.marked.update(stale)
        return stale

    def returned(self, versions: list[int], newest: int) -> None:
        """Count ``versions`` (one per token) returned while ``newest`` is current."""
        counts = self.counts
        counts.returned_tokens += len(versions)
        counts.staleness_sum += sum(newest - v for v in versions)
        counts.max_staleness_returned = max([counts.max_staleness_returned, *(newest - v for v in versions)])

    def snapshot(self) -> dict[str, Any]:
        """The counters, and ``versions_in_flight``: oldest token version -> requests in flight."""
        return {**asdict(self.counts), 'versions_in_flight': dict(sorted(Counter(self.oldest.values()).items()))}
