"""What differs between the two runners: the forward, the LoRA adapters and where checkpoint weights live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from twinkle_async.engines.torch.kv_cache import SlotKVCache
from twinkle_async.engines.torch.lora import LoraAdapters
from twinkle_async.engines.torch.model_runner import Forward, HFForward
from twinkle_async.engines.torch.native.checkpoint import weight_slots
from twinkle_async.engines.torch.native.forward import NativeForward
from twinkle_async.engines.torch.native.lora import NativeLora
from twinkle_async.engines.torch.native.model import NativeCausalLM
from twinkle_async.engines.torch.weight_store import WeightStore

__all__ = ['RunnerParts', 'runner_parts']


@dataclass(frozen=True, slots=True)
class RunnerParts:
    name: str  # 'native' or 'hf'
    forward: Forward
    lora: Union[NativeLora, LoraAdapters]
    weights: WeightStore


def runner_parts(model: Any, cache: SlotKVCache) -> RunnerParts:
    """The native runner's parts for a :class:`NativeCausalLM`, the Hugging Face runner's for any other model."""
    if isinstance(model, NativeCausalLM):
        lora = NativeLora(model)
        return RunnerParts('native', NativeForward(model, lora, cache), lora, WeightStore(weight_slots(model)))
    adapters = LoraAdapters(model)
    return RunnerParts('hf', HFForward(adapters, cache), adapters, WeightStore.for_module(model))
