"""The base model's weights by checkpoint name: checked staging, in-place apply, drop for sleep level 2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from twinkle_async.errors import ConfigurationError
from twinkle_async.weights import NamedTensors, TensorSpec, conform, named_tensors

__all__ = ['WeightStore', 'WeightSlot']


@dataclass(frozen=True, slots=True)
class WeightSlot:
    """Where a checkpoint tensor lives in the served model: the whole of ``owner`` (a parameter), or its
    ``rows`` in a fused layout (q/k/v in one ``qkv``, gate/up in one ``gate_up``)."""

    owner: torch.Tensor
    owner_shape: tuple[int, ...]
    rows: Optional[slice] = None

    @classmethod
    def of(cls, owner: torch.Tensor, rows: Optional[slice] = None) -> WeightSlot:
        return cls(owner, tuple(owner.shape), rows)

    @property
    def place(self) -> tuple[int, Any]:
        """Equal for two names of the same values (tied weights)."""
        return id(self.owner), None if self.rows is None else (self.rows.start, self.rows.stop)

    def target(self) -> torch.Tensor:
        """The tensor to copy the checkpoint's values into (reallocating an owner that ``drop`` released)."""
        if self.owner.numel() == 0 and self.owner_shape:
            self.owner.data = torch.empty(self.owner_shape, dtype=self.owner.dtype, device=self.owner.device)
        return self.owner.data if self.rows is None else self.owner.data[self.rows]


class WeightStore:
    """Names are the checkpoint's (``model.layers.0.self_attn.q_proj.weight``); tied weights answer to each name."""

    def __init__(self, slots: Mapping[str, WeightSlot], on_change: Callable[[], None] = lambda: None) -> None:
        self.slots = dict(slots)
        self.on_change = on_change  # after every apply and drop: what the model derived from its weights is stale
        self.specs = {name: TensorSpec(tuple(slot.owner[slot.rows].shape) if slot.rows else slot.owner_shape,
                                       slot.owner.dtype) for name, slot in self.slots.items()}
        self.device = next(iter(self.slots.values())).owner.device
        self._dropped: set[str] = set()  # names whose storage sleep(2) released and no update brought back
        places: dict[tuple[int, Any], set[str]] = {}
        for name, slot in self.slots.items():
            places.setdefault(slot.place, set()).add(name)
        self._aliases = {name: frozenset(places[slot.place]) for name, slot in self.slots.items()}

    @classmethod
    def for_module(cls, model: Any) -> WeightStore:
        """A Hugging Face model's floating-point ``state_dict`` entries, each the whole of its parameter."""
        return cls({name: WeightSlot.of(t) for name, t in model.state_dict(keep_vars=True).items()
                    if t.dtype.is_floating_point})

    def stage(self, weights: NamedTensors) -> dict[str, torch.Tensor]:
        """Every tensor checked and on the model's device, before any is applied (runs off the engine thread).

        A mapping is complete already, so its tensors are borrowed (the caller keeps them unchanged until
        the update returns); pairs from an iterator are copied, since the source may still fail midway.

        Raises:
            WeightUpdateError: a name, shape or dtype that does not fit (or the source raised).
        """
        borrow = isinstance(weights, Mapping)
        staged: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors(weights):
            checked = conform(name, tensor, self.specs)
            staged[name] = checked.to(self.device, copy=not borrow and checked.data_ptr() == tensor.data_ptr())
        return staged

    def apply(self, staged: Mapping[str, torch.Tensor]) -> None:
        """Copy staged tensors into the model in place (engine thread, between steps)."""
        try:
            for name, tensor in staged.items():
                self.slots[name].target().copy_(tensor)
                self._dropped -= self._aliases[name]  # tied weights: one name brings back every alias
        finally:
            self.on_change()

    def drop(self) -> None:
        """Release every weight's storage (sleep level 2); ``apply`` brings them back."""
        for slot in self.slots.values():
            slot.owner.data = torch.empty(0, dtype=slot.owner.dtype, device=slot.owner.device)
        self._dropped = set(self.slots)
        self.on_change()

    def check_complete(self) -> None:
        """Raises ConfigurationError naming a weight still dropped."""
        missing = sorted(self._dropped)
        if missing:
            raise ConfigurationError(f'{len(missing)} weight(s) are still dropped by sleep(level=2), e.g. '
                                     f'{missing[0]!r}: update_weights with every weight before wake_up()')
