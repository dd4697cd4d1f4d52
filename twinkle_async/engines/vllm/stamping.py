"""Per-request output queues that remember which weight version produced each vLLM output.

vLLM's engine core labels every step's outputs with the weight version set by
``update_weight_version``; its output handler passes the label to ``process_outputs`` and then puts
each request's ``RequestOutput`` in that request's queue. ``VersionLabels`` records the label of the
outputs being processed, and ``StampedQueue`` (put in place of vLLM's per-request queue) stores it
with each output, without merging outputs of different versions.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

__all__ = ['VersionLabels', 'StampedQueue']


class VersionLabels:
    """The weight version of the outputs vLLM's output handler is processing now."""

    def __init__(self, output_processor: Any) -> None:
        self.current = 0
        process_outputs = output_processor.process_outputs

        def labelled(*args: Any, weight_version: Optional[str] = None, **kwargs: Any) -> Any:
            self.current = _parse(weight_version, self.current)
            return process_outputs(*args, weight_version=weight_version, **kwargs)

        output_processor.process_outputs = labelled


class StampedQueue:
    """Replaces the ``put`` of one request's vLLM queue; ``get`` returns ``(version, output)`` pairs."""

    __slots__ = ('_labels', '_items', '_error', '_ready')

    def __init__(self, vllm_queue: Any, labels: VersionLabels) -> None:
        self._labels = labels
        self._items: list[tuple[int, Any]] = []
        self._error: Optional[BaseException] = None
        self._ready = asyncio.Event()
        pending = vllm_queue.output  # put before we took over (rare): same step, same label
        vllm_queue.put = self.put
        if pending is not None:
            vllm_queue.output = None
            self.put(pending)

    def put(self, output: Any) -> None:
        if isinstance(output, BaseException):
            self._error = output
        else:
            self._items.append((self._labels.current, output))
        self._ready.set()

    async def get(self) -> list[tuple[int, Any]]:
        """Every output received since the last call (waits for at least one)."""
        while not self._items and self._error is None:
            await self._ready.wait()
        self._ready.clear()
        if not self._items:
            assert self._error is not None
            raise self._error
        items, self._items = self._items, []
        return items


def _parse(label: Optional[str], default: int) -> int:
    try:
        return int(label) if label is not None else default
    except ValueError:
        return 0
