"""Forward passes over the KV cache: packed prefill of new prompts, one-token decode of all rows.

:class:`ModelRunner` plans each pass (tokens, positions, slots, masks) and hands it to a :class:`Forward`: the
native Llama-family model (:class:`~twinkle_async.engines.torch.native.forward.NativeForward`) or an unmodified
Hugging Face model (:class:`HFForward`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence

import torch

from twinkle_async.engines.torch.attention import ATTENTION_NAME
from twinkle_async.engines.torch.kv_cache import KVCache, SlotKVCache
from twinkle_async.engines.torch.lora import LoraAdapters
from twinkle_async.engines.torch.scheduler import Chunk
from twinkle_async.engines.torch.sequence import Request, Sample
from twinkle_async.engines.torch.slots import SlotTable

__all__ = ['ModelRunner', 'StepLogits', 'MixedBatch', 'Forward', 'HFForward', 'additive_mask']


@dataclass(slots=True)
class MixedBatch:
    """One step's tokens packed in one row: ``rows`` decode tokens (row ``i`` in slot ``i``) then each prefill
    chunk's prompt tokens; logits are wanted at token indices ``keep``."""

    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T]
    rows: int
    decode_mask: Optional[torch.Tensor]  # [rows, 1, 1, L] additive, over the rows' cached positions
    chunk_slots: torch.Tensor    # [T - rows]: the slot each chunk token is cached in
    chunks: list[tuple[int, int, int, int]]  # per chunk: (first token in the pack, end in the pack, slot, position)
    adapters: list[str]          # per token
    keep: torch.Tensor


class Forward(Protocol):
    """One model's forward passes over its KV cache (planned by :class:`ModelRunner`)."""

    chunked: bool
    """Whether :meth:`mixed` exists: decode rows and prefill chunks (which read the cache) in one forward."""

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bounds: list[int],
               keep: torch.Tensor, adapter: str, pixels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Whole sequences packed in one row (token ``t`` cached at ``(slots[t], positions[t])``, sequence ``i`` is
        ``bounds[i]:bounds[i+1]`` from position 0), all of ``adapter``; the logits at token indices ``keep``.
        ``pixels``: the image processor's tensors of the one sequence's images (it is then alone in the row)."""

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               adapters: Sequence[str]) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (slot ``i`` is row ``i``); additive ``mask [B, 1, 1, L]`` over
        the cached positions; returns the next-token logits ``[B, V]``."""

    def mixed(self, batch: MixedBatch) -> torch.Tensor:
        """The logits at ``batch.keep`` (only where ``chunked``)."""


@dataclass(slots=True)
class StepLogits:
    """A step's logits: every decode row's, and per prefill chunk (in order) those it yielded."""

    decode: Optional[torch.Tensor]                      # [rows, V]
    chunks: list[torch.Tensor] = field(default_factory=list)  # [tokens, V]: all its tokens (prompt logprobs
    # asked) or its last one when it completes the prompt; empty otherwise


class ModelRunner:
    """Plans each forward over the KV cache (giving prefill chunks room for what they write; decode rows got theirs
    from the scheduler) and runs it with ``forward``."""

    def __init__(self, forward: Forward, cache: KVCache, table: SlotTable, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.forward = forward
        self.cache = cache
        self.table = table
        self.device = device
        self.dtype = dtype

    def step(self, rows: int, chunks: list[Chunk]) -> StepLogits:
        """Decode rows ``0..rows-1`` and prefill ``chunks``: one forward where the model allows, else a decode
        forward and one packed forward per run of chunks of one adapter (whole prompts then)."""
        wanted = [self._wanted(chunk) for chunk in chunks]
        if self.forward.chunked:
            return self._mixed(rows, chunks, wanted)
        result = StepLogits(self.decode(rows) if rows else None)
        at = 0
        for _, run in itertools.groupby(chunks, key=lambda c: _forward_group(c.request)):
            group = list(run)
            keep = torch.tensor(self._offsets(group, wanted[at:at + len(group)]), device=self.device)
            logits = self._forward_packed([c.tokens for c in group], [c.slot for c in group],
                                          keep, group[0].request.adapter, group[0].request.pixels)
            result.chunks += self._split(logits, wanted[at:at + len(group)])
            at += len(group)
        return result

    def recompute(self, samples: list[Sample]) -> None:
        """Rebuild the cached KV of running samples of one adapter from their tokens (new weights); a sample with
        images in a forward of its own."""
        for _, run in itertools.groupby(samples, key=lambda s: _forward_group(s.request)):
            group = list(run)
            sequences = [s.request.prompt_token_ids + s.output_ids[:-1] for s in group]
            keep = torch.tensor([len(sequences[0]) - 1], device=self.device)
            self._forward_packed(sequences, [s.slot for s in group], keep, group[0].request.adapter,
                                 group[0].request.pixels)

    def decode(self, rows: int) -> torch.Tensor:
        """One token for each of rows ``0..rows-1``; returns their next-token logits ``[rows, V]``."""
        positions, mask = self._plan_decode(rows)
        logits = self.forward.decode(self.table.last_tokens[:rows], positions, mask, self.table.adapters[:rows])
        self.table.positions[:rows] += 1
        return logits

    def _mixed(self, rows: int, chunks: list[Chunk], wanted: list[list[int]]) -> StepLogits:
        no_rows = (torch.empty(0, dtype=torch.long, device=self.device), None)
        positions, mask = self._plan_decode(rows) if rows else no_rows
        tokens = [t for c in chunks for t in c.tokens[c.start:c.end]]
        chunk_positions = [p for c in chunks for p in range(c.start, c.end)]
        spans, at = [], rows
        for chunk in chunks:
            spans.append((at, at + chunk.end - chunk.start, chunk.slot, chunk.start))
            at += chunk.end - chunk.start
            self.cache.grow(chunk.slot, chunk.end)
        keep = list(range(rows)) + [rows + offset for offset in self._offsets(chunks, wanted)]
        batch = MixedBatch(
            input_ids=torch.cat([self.table.last_tokens[:rows], torch.tensor(tokens, dtype=torch.long,
                                                                              device=self.device)]),
            positions=torch.cat([positions, torch.tensor(chunk_positions, dtype=torch.long, device=self.device)]),
            rows=rows, decode_mask=mask,
            chunk_slots=torch.tensor([c.slot for c in chunks for _ in range(c.start, c.end)], dtype=torch.long,
                                     device=self.device),
            chunks=spans, adapters=[*self.table.adapters[:rows], *(c.request.adapter for c in chunks
                                                                   for _ in range(c.start, c.end))],
            keep=torch.tensor(keep, dtype=torch.long, device=self.device))
        logits = self.forward.mixed(batch)
        if rows:
            self.table.positions[:rows] += 1
        return StepLogits(logits[:rows] if rows else None, self._split(logits[rows:], wanted))

    def _plan_decode(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.table.positions[:rows]  # the scheduler gave each row room for it
        kv_len = int(positions.max()) + 1
        visible = torch.arange(kv_len, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)
        return positions, additive_mask(visible, self.dtype)[:, None, None]

    def _forward_packed(self, sequences: list[list[int]], slots: list[int], keep: torch.Tensor, adapter: str,
                        pixels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        lengths = [len(s) for s in sequences]
        input_ids = torch.tensor([t for s in sequences for t in s], device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        token_slots = torch.repeat_interleave(torch.tensor(slots, device=self.device),
                                              torch.tensor(lengths, device=self.device))
        for slot, length in zip(slots, lengths):
            self.cache.grow(slot, length)
        bounds = [0, *itertools.accumulate(lengths)]
        return self.forward.packed(input_ids, positions, token_slots, bounds, keep, adapter, pixels)

    @staticmethod
    def _wanted(chunk: Chunk) -> list[int]:
        """The chunk's token offsets whose logits are needed (none for a preempted sample's)."""
        if chunk.sample is not None:
            return []
        if chunk.request.params.prompt_logprobs is not None:
            return list(range(chunk.end - chunk.start))
        return [chunk.end - chunk.start - 1] if chunk.completes else []

    @staticmethod
    def _offsets(chunks: Sequence[Chunk], wanted: list[list[int]]) -> list[int]:
        """Token indices (within the chunks' part of the pack) of the wanted logits."""
        offsets, at = [], 0
        for chunk, offsets_in_chunk in zip(chunks, wanted):
            offsets += [at + offset for offset in offsets_in_chunk]
            at += chunk.end - chunk.start
        return offsets

    @staticmethod
    def _split(logits: torch.Tensor, wanted: list[list[int]]) -> list[torch.Tensor]:
        return list(logits.split([len(w) for w in wanted]))


class HFForward:
    """An unmodified Hugging Face causal LM (with its PEFT adapters), :class:`SlotKVCache` as its cache."""

    chunked = False

    def __init__(self, lora: LoraAdapters, cache: SlotKVCache) -> None:
        self.lora = lora
        self.cache = cache
        self.packed_bounds = lora.base.config._attn_implementation == ATTENTION_NAME

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bounds: list[int],
               keep: torch.Tensor, adapter: str, pixels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        self.cache.plan_prefill(slots, positions)
        if self.packed_bounds:
            spans = torch.tensor(bounds, device=input_ids.device)
            attention = {'cu_seq_lens_q': spans, 'cu_seq_lens_k': spans}
        else:  # HF's own attention: a block-diagonal causal mask
            attention = {'attention_mask': self._block_diagonal(positions, bounds)}
        return self.lora.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                               past_key_values=self.cache, use_cache=True, logits_to_keep=keep, **attention,
                               **self._on_device(pixels), **self.lora.forward_kwargs([adapter], 1)).logits[0]

    def _on_device(self, pixels: Optional[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The image tensors on the model's device, floating ones in its dtype."""
        base = self.lora.base
        return {key: value.to(base.device, base.dtype if value.is_floating_point() else value.dtype)
                for key, value in (pixels or {}).items()}

    def mixed(self, batch: MixedBatch) -> torch.Tensor:
        raise NotImplementedError('the Hugging Face runner prefills whole prompts in their own forward')

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               adapters: Sequence[str]) -> torch.Tensor:
        self.cache.plan_decode(len(positions), positions, mask.shape[-1])
        return self.lora.model(input_ids=input_ids.unsqueeze(1), position_ids=positions.unsqueeze(1),
                               attention_mask=mask, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                               **self.lora.forward_kwargs(list(adapters), len(adapters))).logits[:, -1]

    def _block_diagonal(self, positions: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        lengths = torch.tensor([end - start for start, end in zip(bounds[:-1], bounds[1:])], device=positions.device)
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=positions.device), lengths)
        visible = (seq_ids.unsqueeze(1) == seq_ids.unsqueeze(0)) & (positions.unsqueeze(1) >= positions.unsqueeze(0))
        return additive_mask(visible, self.lora.base.dtype)[None, None]


def _forward_group(request: Request) -> tuple[str, Optional[Request]]:
    """Requests packed into one forward share the adapter and have no images (one with images goes alone)."""
    return request.adapter, request if request.pixels is not None else None


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, the dtype's lowest value elsewhere (SDPA's additive mask)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=visible.device))
