"""Forward passes over the slot KV cache: packed prefill of new prompts, one-token decode of all rows."""

from __future__ import annotations

import itertools

import torch

from twinkle_async.engines.torch.attention import ATTENTION_NAME
from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.engines.torch.lora import LoraAdapters
from twinkle_async.engines.torch.sequence import Request, Sample
from twinkle_async.engines.torch.slots import SlotTable

__all__ = ['ModelRunner', 'PrefillResult']


class PrefillResult:
    """Logits of each request's last prompt token and, where asked, of every prompt position."""

    __slots__ = ('last_logits', 'prompt_logits')

    def __init__(self, last_logits: torch.Tensor, prompt_logits: dict[str, torch.Tensor]) -> None:
        self.last_logits = last_logits          # [num_requests, V]
        self.prompt_logits = prompt_logits      # request_id -> [prompt_len - 1, V]


class ModelRunner:
    """Runs an unmodified Hugging Face causal LM (with its LoRA adapters) on :class:`SlotKVCache`."""

    def __init__(self, lora: LoraAdapters, cache: SlotKVCache, table: SlotTable, device: torch.device) -> None:
        self.lora = lora
        self.cache = cache
        self.table = table
        self.device = device
        model = lora.base
        self.mask_min = torch.finfo(model.dtype).min
        self.mask_dtype = model.dtype
        self.packed_bounds = model.config._attn_implementation == ATTENTION_NAME

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
        mask = self._additive(visible)[:, None, None, :]
        logits = self.lora.model(input_ids=self.table.last_tokens[:rows].unsqueeze(1),
                                 position_ids=positions.unsqueeze(1), attention_mask=mask,
                                 past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                                 **self.lora.forward_kwargs(self.table.adapters, rows)).logits[:, -1]
        self.table.positions[:rows] += 1
        return logits

    def _forward_packed(self, sequences: list[list[int]], slots: list[int], keep: torch.Tensor,
                        adapter: str) -> torch.Tensor:
        """Sequences packed in one row, each cached from position 0 in its slot; logits at ``keep``."""
        lengths = [len(s) for s in sequences]
        input_ids = torch.tensor([t for s in sequences for t in s], device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        seq_ids = torch.repeat_interleave(torch.arange(len(sequences), device=self.device),
                                          torch.tensor(lengths, device=self.device))
        self.cache.ensure_capacity(max(lengths) + 1)
        self.cache.plan_prefill(torch.tensor(slots, device=self.device)[seq_ids], positions)
        return self.lora.model(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                               past_key_values=self.cache, use_cache=True, logits_to_keep=keep,
                               **self._prefill_attention(seq_ids, positions, lengths),
                               **self.lora.forward_kwargs([adapter], 1)).logits[0]

    def _prefill_attention(self, seq_ids: torch.Tensor, positions: torch.Tensor,
                           lengths: list[int]) -> dict[str, torch.Tensor]:
        """Sequence bounds for our attention; a block-diagonal causal mask for HF's own ones."""
        if self.packed_bounds:
            bounds = torch.tensor([0, *itertools.accumulate(lengths)], device=self.device)
            return {'cu_seq_lens_q': bounds, 'cu_seq_lens_k': bounds}
        return {'attention_mask': self._prefill_mask(seq_ids, positions)}

    def _prefill_mask(self, seq_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        same_sequence = seq_ids.unsqueeze(1) == seq_ids.unsqueeze(0)
        causal = positions.unsqueeze(1) >= positions.unsqueeze(0)
        return self._additive(same_sequence & causal)[None, None]

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.mask_dtype, device=self.device)
        return torch.where(visible, zero, torch.tensor(self.mask_min, dtype=self.mask_dtype, device=self.device))

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
