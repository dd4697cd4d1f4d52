"""The native model's forward passes over the slot KV cache (the runner's :class:`Forward` for it)."""

from __future__ import annotations

from typing import Sequence

import torch

from twinkle_async.engines.torch.attention import causal_packed, grouped_decode
from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.engines.torch.native.lora import NativeLora
from twinkle_async.engines.torch.native.model import NativeCausalLM

__all__ = ['NativeForward']


class NativeForward:
    """:class:`NativeCausalLM` with batched LoRA (:class:`NativeLora`) on :class:`SlotKVCache`."""

    def __init__(self, model: NativeCausalLM, lora: NativeLora, cache: SlotKVCache) -> None:
        self.model, self.lora, self.cache = model, lora, cache
        self.scale = model.shape.head_dim ** -0.5

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bounds: list[int],
               keep: torch.Tensor, adapter: str) -> torch.Tensor:
        def attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            self.cache.write(layer, slots, positions, key, value)
            return causal_packed(query, key, value, bounds, self.scale).reshape(len(query), -1)

        hidden = self.model(input_ids, positions, attention, self.lora.delta([adapter]))
        return self.model.logits(hidden[keep])

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               adapters: Sequence[str]) -> torch.Tensor:
        rows, length = len(input_ids), mask.shape[-1]
        row_slots = torch.arange(rows, device=input_ids.device)

        def attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            self.cache.write(layer, row_slots, positions, key, value)
            keys, values = self.cache.rows(layer, rows, length)
            return grouped_decode(query, keys, values, mask, self.scale).reshape(rows, -1)

        hidden = self.model(input_ids, positions, attention, self.lora.delta(adapters))
        return self.model.logits(hidden)
