"""Admission and slot bookkeeping: a FIFO of waiting requests and the running samples in slot order."""

from __future__ import annotations

from collections import deque
from typing import Optional

from twinkle_async.engines.torch.sequence import Request, Sample

__all__ = ['Scheduler']


class Scheduler:
    """``running[i]`` is the sample in KV slot ``i``; slots stay dense (``0..len(running)-1``)."""

    def __init__(self, num_slots: int, max_batched_tokens: int) -> None:
        self.num_slots = num_slots
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Sample] = []
        self.requests: dict[str, Request] = {}

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots, FIFO, within the prefill token budget."""
        admitted: list[Request] = []
        tokens = 0
        while self.waiting:
            request = self.waiting[0]
            prompt = len(request.prompt_token_ids)
            fits_slots = len(self.running) + len(request.samples) <= self.num_slots
            if not fits_slots or (admitted and tokens + prompt > self.max_batched_tokens):
                break
            self.waiting.popleft()
            for sample in request.samples:
                sample.slot = len(self.running)
                self.running.append(sample)
            admitted.append(request)
            tokens += prompt
        return admitted

    def release(self, sample: Sample) -> Optional[tuple[int, int]]:
        """Free ``sample``'s slot; returns ``(src, dst)`` when the last slot moved into the hole."""
        slot, last = sample.slot, self.running.pop()
        sample.slot = -1
        if last is sample:
            return None
        self.running[slot] = last
        last.slot = slot
        return len(self.running), slot

    def finish(self, request: Request) -> None:
        """Forget a request whose samples all finished."""
        self.requests.pop(request.request_id, None)

    def remove_waiting(self, request: Request) -> None:
        self.waiting.remove(request)
        self.finish(request)
