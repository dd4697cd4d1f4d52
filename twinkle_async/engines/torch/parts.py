"""What differs between the two runners: the forward, the LoRA adapters and where checkpoint weights live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch

from twinkle_async.engines.torch.kv_cache import KVCache, SlotKVCache
from twinkle_async.engines.torch.lora import LoraAdapters
from twinkle_async.engines.torch.model_runner import Forward, HFForward
from twinkle_async.engines.torch.native.checkpoint import weight_slots
from twinkle_async.engines.torch.native.forward import NativeForward
from twinkle_async.engines.torch.native.lora import NativeLora
from twinkle_async.engines.torch.native.model import NativeCausalLM
from twinkle_async.engines.torch.paged_cache import PagedKVCache
from twinkle_async.engines.torch.weight_store import WeightStore

__all__ = ['RunnerParts', 'CacheLimits', 'runner_parts']


@dataclass(frozen=True, slots=True)
class CacheLimits:
    num_slots: int     # samples, and the staging slot
    max_len: int       # positions per sample
    memory_bytes: int  # the paged cache's pool
    block_size: int    # positions per block of the paged cache


@dataclass(frozen=True, slots=True)
class RunnerParts:
    name: str  # 'native' or 'hf'
    forward: Forward
    lora: Union[NativeLora, LoraAdapters]
    weights: WeightStore
    cache: KVCache


def runner_parts(model: Any, limits: CacheLimits, device: torch.device) -> RunnerParts:
    """The native runner's parts (a paged KV cache) for a :class:`NativeCausalLM`, the Hugging Face runner's (a slot
    KV cache) for any other model."""
    if isinstance(model, NativeCausalLM):
        cache = PagedKVCache.for_model(model, limits.num_slots, limits.max_len, limits.memory_bytes,
                                       limits.block_size, device)
        lora = NativeLora(model)
        weights = WeightStore(weight_slots(model), on_change=lambda: model.ops.weights_changed())
        return RunnerParts('native', NativeForward(model, lora, cache), lora, weights, cache)
    slots = SlotKVCache.for_model(model, limits.num_slots, limits.max_len, device)
    adapters = LoraAdapters(model)
    return RunnerParts('hf', HFForward(adapters, slots), adapters, WeightStore.for_module(model), slots)
