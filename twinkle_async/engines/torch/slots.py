"""Per-slot sampling state as tensors, so every step samples the whole batch with tensor ops."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from twinkle_async.adapters import BASE_MODEL
from twinkle_async.engines.base import RequestParams

__all__ = ['SlotTable']


class SlotTable:
    """Row ``i`` describes the sample in KV slot ``i``: position, last token, sampling knobs."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device, seed: int) -> None:
        self.vocab_size = vocab_size
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.last_tokens = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.temperature = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.greedy = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.top_k = torch.full((num_slots,), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.penalty = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.seen = torch.zeros((num_slots, vocab_size), dtype=torch.bool, device=device)
        self.generators: list[Optional[torch.Generator]] = [None] * num_slots
        self.adapters: list[str] = [BASE_MODEL] * num_slots
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)
        self._device = device
        self._rows = (self.positions, self.last_tokens, self.temperature, self.greedy, self.top_k,
                      self.top_p, self.penalty, self.seen)

    def assign(self, slot: int, params: RequestParams, tokens: Sequence[int], generator: Optional[torch.Generator],
               adapter: str, next_token: Optional[int] = None) -> None:
        """Fill row ``slot`` for a sample whose KV holds ``tokens`` (a new sample: its prompt); a sample resuming
        after a preemption passes its newest token as ``next_token`` (fed next, after ``tokens``). ``generator``:
        the sample's own (:meth:`seeded`), or ``None`` to draw from the shared one."""
        self.adapters[slot] = adapter
        self.positions[slot] = len(tokens)
        self.greedy[slot] = params.temperature == 0
        self.temperature[slot] = params.temperature or 1.0
        self.top_k[slot] = params.top_k if params.top_k > 0 else self.vocab_size
        self.top_p[slot] = params.top_p
        self.penalty[slot] = params.repetition_penalty
        self.seen[slot] = False
        if params.repetition_penalty != 1.0:
            seen = [*tokens, next_token] if next_token is not None else tokens
            self.seen[slot, torch.as_tensor(seen, device=self._device)] = True
        if next_token is not None:
            self.last_tokens[slot] = next_token
        self.generators[slot] = generator

    def seeded(self, seed: Optional[int]) -> Optional[torch.Generator]:
        """A generator for a sample with ``seed`` (``None``: the sample draws from the shared one)."""
        if seed is None:
            return None
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed)
        return generator

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (compaction after a release)."""
        for row in self._rows:
            row[dst] = row[src]
        self.generators[dst] = self.generators[src]
        self.generators[src] = None
        self.adapters[dst] = self.adapters[src]

    def advance(self, rows: slice, tokens: torch.Tensor, track_seen: bool) -> None:
        """Record the tokens just sampled for ``rows``: they are fed at the next position.

        ``track_seen`` (some row uses a repetition penalty) also marks them as seen; rows without a
        penalty never read ``seen``.
        """
        self.last_tokens[rows] = tokens
        if track_seen:
            start = rows.start or 0
            self.seen[torch.arange(start, start + len(tokens), device=self._device), tokens] = True

