"""The base model's weights by checkpoint name: checked staging, in-place apply, drop for sleep level 2."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from twinkle_async.errors import ConfigurationError
from twinkle_async.weights import NamedTensors, TensorSpec, conform, named_tensors

__all__ = ['WeightStore']


class WeightStore:
    """Names are the model's ``state_dict`` keys (tied weights answer to each of their names)."""

    def __init__(self, model: Any) -> None:
        self.tensors: dict[str, torch.Tensor] = {
            name: t for name, t in model.state_dict(keep_vars=True).items() if t.dtype.is_floating_point}
        self.specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in self.tensors.items()}
        self.device = next(iter(self.tensors.values())).device
        self._dropped: set[int] = set()  # ids of tensors whose storage sleep(2) released

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

    def apply(self, staged: dict[str, torch.Tensor]) -> None:
        """Copy staged tensors into the model in place (engine thread, between steps)."""
        for name, tensor in staged.items():
            target = self.tensors[name]
            if id(target) in self._dropped:
                target.data = tensor.clone()
                self._dropped.discard(id(target))
            else:
                target.copy_(tensor)

    def drop(self) -> None:
        """Release every weight's storage (sleep level 2); ``apply`` brings them back."""
        for tensor in self.tensors.values():
            if id(tensor) not in self._dropped:
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                self._dropped.add(id(tensor))

    def check_complete(self) -> None:
        """Raises ConfigurationError naming a weight still dropped."""
        missing = [name for name, t in self.tensors.items() if id(t) in self._dropped]
        if missing:
            raise ConfigurationError(f'{len(missing)} weight(s) are still dropped by sleep(level=2), e.g. '
                                     f'{missing[0]!r}: update_weights with every weight before wake_up()')
