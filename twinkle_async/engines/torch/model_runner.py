"""Forward passes over the slot KV cache: packed prefill of new prompts, one-token decode of all rows.

:class:`ModelRunner` plans each pass (tokens, positions, slots, masks) and hands it to a :class:`Forward`: the
native Llama-family model (:class:`~twinkle_async.engines.torch.native.forward.NativeForward`) or an unmodified
Hugging Face model (:class:`HFForward`).
"""

from __future__ import annotations

import itertools
from typing import Protocol, Sequence

import torch

from twinkle_async.engines.torch.attention import ATTENTION_NAME
from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.engines.torch.lora import LoraAdapters
from twinkle_async.engines.torch.sequence import Request, Sample
from twinkle_async.engines.torch.slots import SlotTable

__all__ = ['ModelRunner', 'PrefillResult', 'Forward', 'HFForward']


class Forward(Protocol):
    """One model's forward passes over the slot cache (planned by :class:`ModelRunner`)."""

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bounds: list[int],
               keep: torch.Tensor, adapter: str) -> torch.Tensor:
        """Sequences packed in one row (token ``t`` cached at ``(slots[t], positions[t])``, sequence ``i`` is
        ``bounds[i]:bounds[i+1]``), all of ``adapter``; the logits at token indices ``keep``."""

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               adapters: Sequence[str]) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (slot ``i`` is row ``i``); additive ``mask [B, 1, 1, L]`` over
        the cached positions; returns the next-token logits ``[B, V]``."""


class PrefillResult:
    """Logits of each request's last prompt token and, where asked, of every prompt position."""

    __slots__ = ('last_logits', 'prompt_logits')

    def __init__(self, last_logits: torch.Tensor, prompt_logits: dict[str, torch.Tensor]) -> None:
        self.last_logits = last_logits          # [num_requests, V]
        self.prompt_logits = prompt_logits      # request_id -> [prompt_len - 1, V]


class ModelRunner:
    """Plans each forward over :class:`SlotKVCache` and runs it with ``forward``."""

    def __init__(self, forward: Forward, cache: SlotKVCache, table: SlotTable, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.forward = forward
        self.cache = cache
        self.table = table
        self.device = device
        self.dtype = dtype

    def prefill(self, requests: list[Request]) -> PrefillResult:
        """One packed forward over prompts of one adapter; copies the prompt KV to every sample's slot."""
        prompts = [r.prompt_token_ids for r in requests]
        keep, spans = self._logits_to_keep(requests, [len(p) for p in prompts])
        logits = self._forward_packed(prompts, [r.samples[0].slot for r in requests], keep, requests[0].adapter)
        for request in requests:
            for sample in request.samples[1:]:
                self.cache.copy_slot(request.samples[0].slot, sample.slot, len(request.prompt_token_ids))
        last = logits[torch.tensor([end - 1 for _, end in spans], device=self.device)]
        prompt = {r.request_id: logits[start:end - 1] for r, (start, end) in zip(requests, spans)
                  if r.params.prompt_logprobs is not None}
        return PrefillResult(last, prompt)

    def recompute(self, samples: list[Sample]) -> None:
        """Rebuild the cached KV of running samples of one adapter from their tokens (new weights)."""
        sequences = [s.request.prompt_token_ids + s.output_ids[:-1] for s in samples]
        keep = torch.tensor([len(sequences[0]) - 1], device=self.device)
        self._forward_packed(sequences, [s.slot for s in samples], keep, samples[0].request.adapter)

    def decode(self, rows: int) -> torch.Tensor:
        """One token for each of rows ``0..rows-1``; returns their next-token logits ``[rows, V]``."""
        positions = self.table.positions[:rows]
        kv_len = int(positions.max()) + 1
        self.cache.ensure_capacity(kv_len)
        self.cache.plan_decode(rows, positions, kv_len)
        visible = torch.arange(kv_len, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)
        logits = self.forward.decode(self.table.last_tokens[:rows], positions,
                                     additive_mask(visible, self.dtype)[:, None, None], self.table.adapters[:rows])
        self.table.positions[:rows] += 1
        return logits

    def _forward_packed(self, sequences: list[list[int]], slots: list[int], keep: torch.Tensor,
                        adapter: str) -> torch.Tensor:
        lengths = [len(s) for s in sequences]
        input_ids = torch.tensor([t for s in sequences for t in s], device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        token_slots = torch.repeat_interleave(torch.tensor(slots, device=self.device),
                                              torch.tensor(lengths, device=self.device))
        self.cache.ensure_capacity(max(lengths) + 1)
        self.cache.plan_prefill(token_slots, positions)
        bounds = [0, *itertools.accumulate(lengths)]
        return self.forward.packed(input_ids, positions, token_slots, bounds, keep, adapter)

    def _logits_to_keep(self, requests: list[Request],
                        lengths: list[int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Token indices whose logits are needed, and each request's span within that selection."""
        keep: list[int] = []
        spans: list[tuple[int, int]] = []
        offset = 0
        for request, length in zip(requests, lengths):
            wanted = range(offset, offset + length) if request.params.prompt_logprobs is not None \
                else range(offset + length - 1, offset + length)
            spans.append((len(keep), len(keep) + len(wanted)))
            keep.extend(wanted)
            offset += length
        return torch.tensor(keep, device=self.device), spans


class HFForward:
    """An unmodified Hugging Face causal LM (with its PEFT adapters), :class:`SlotKVCache` as its cache."""

    def __init__(self, lora: LoraAdapters, cache: SlotKVCache) -> None:
        self.lora = lora
        self.cache = cache
        self.packed_bounds = lora.base.config._attn_implementation == ATTENTION_NAME

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bounds: list[int],
               keep: torch.Tensor, adapter: str) -> torch.Tensor:
        if self.packed_bounds:
            spans = torch.tensor(bounds, device=input_ids.device)
            attention = {'cu_seq_lens_q': spans, 'cu_seq_lens_k': spans}
        else:  # HF's own attention: a block-diagonal causal mask
            attention = {'attention_mask': self._block_diagonal(positions, bounds)}
        return self.lora.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                               past_key_values=self.cache, use_cache=True, logits_to_keep=keep, **attention,
                               **self.lora.forward_kwargs([adapter], 1)).logits[0]

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               adapters: Sequence[str]) -> torch.Tensor:
        return self.lora.model(input_ids=input_ids.unsqueeze(1), position_ids=positions.unsqueeze(1),
                               attention_mask=mask, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                               **self.lora.forward_kwargs(list(adapters), len(adapters))).logits[:, -1]

    def _block_diagonal(self, positions: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        lengths = torch.tensor([end - start for start, end in zip(bounds[:-1], bounds[1:])], device=positions.device)
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=positions.device), lengths)
        visible = (seq_ids.unsqueeze(1) == seq_ids.unsqueeze(0)) & (positions.unsqueeze(1) >= positions.unsqueeze(0))
        return additive_mask(visible, self.lora.base.dtype)[None, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, the dtype's lowest value elsewhere (SDPA's additive mask)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=visible.device))
