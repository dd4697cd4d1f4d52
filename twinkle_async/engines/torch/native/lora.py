"""Batched LoRA for the native runner: each adapter's A/B per projection, applied to the rows that use it.

A batch mixing adapters runs as one forward: after each fused projection, the rows of every adapter present
get ``(x @ A.T) @ B.T * scale`` added to their columns of that projection (q/k/v within ``qkv``, gate/up within
``gate_up``), as PEFT computes it. Runs on the engine thread only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from twinkle_async.adapters import BASE_MODEL, AdapterSpec
from twinkle_async.engines.torch.lora import AdapterTensors
from twinkle_async.engines.torch.native.model import LoraDelta, NativeCausalLM
from twinkle_async.errors import AdapterNotFoundError, InvalidAdapterError

__all__ = ['NativeLora']

_KEY = re.compile(r'base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight')


@dataclass(frozen=True, slots=True)
class _Update:
    """One adapted projection: ``out[:, columns] += (x @ a.T) @ b.T * scale``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    columns: slice


class NativeLora(AdapterTensors):
    """Adapters of a :class:`NativeCausalLM`, keyed by their PEFT-saved tensor names."""

    def __init__(self, model: NativeCausalLM) -> None:
        super().__init__()
        self.model = model
        self._updates: dict[str, dict[tuple[int, str], list[_Update]]] = {}

    def add(self, spec: AdapterSpec) -> None:
        """Load ``spec`` (replacing an adapter of the same name).

        Raises:
            InvalidAdapterError: a tensor that adapts no projection of the model, or one of the wrong shape.
        """
        tensors = {key: t.detach().to(self.model.dtype).clone() for key, t in spec.tensors.items()}
        updates: dict[tuple[int, str], list[_Update]] = {}
        for key, a in tensors.items():
            match = _KEY.fullmatch(key)
            if match is None:
                raise InvalidAdapterError(f'adapter {spec.name!r}: {key!r} adapts no attention or MLP projection '
                                          "of the native runner (engine_args={'runner': 'hf'} serves it)")
            if match.group(4) == 'B':
                continue
            b = tensors.get(key.replace('.lora_A.', '.lora_B.'))
            if b is None:
                raise InvalidAdapterError(f'adapter {spec.name!r}: {key!r} has no lora_B partner')
            layer, projection = int(match.group(2)), match.group(3)
            fused, columns = self._columns(projection)
            scale = _scale(spec.config, match.group(1), a.shape[0])
            updates.setdefault((layer, fused), []).append(_Update(a, b, scale, columns))
        self.params[spec.name], self._updates[spec.name] = tensors, updates

    def remove(self, name: str) -> None:
        """Unload adapter ``name``.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        if name not in self.params:
            raise AdapterNotFoundError(f'adapter {name!r} is not loaded')
        del self.params[name], self._updates[name]

    def delta(self, adapters: Sequence[str]) -> Optional[LoraDelta]:
        """The LoRA updates for a batch whose row ``i`` uses ``adapters[i]`` (one name: every row uses it);
        ``None`` when no row uses an adapter."""
        used = set(adapters) - {BASE_MODEL}
        if not used:
            return None
        if len(adapters) == 1 or set(adapters) == used and len(used) == 1:
            updates = self._updates[next(iter(used))]
            return lambda layer, fused, x, out: _apply(updates.get((layer, fused), ()), x, out, None)
        device = self.model.embed_tokens.weight.device
        groups = [(self._updates[name], torch.tensor([i for i, a in enumerate(adapters) if a == name], device=device))
                  for name in sorted(used)]

        def apply(layer: int, fused: str, x: torch.Tensor, out: torch.Tensor) -> None:
            for updates, rows in groups:
                _apply(updates.get((layer, fused), ()), x, out, rows)
        return apply

    def _columns(self, projection: str) -> tuple[str, slice]:
        shape = self.model.shape
        q, kv, inter = shape.q_size, shape.kv_size, shape.intermediate
        return {'q_proj': ('qkv', slice(0, q)), 'k_proj': ('qkv', slice(q, q + kv)),
                'v_proj': ('qkv', slice(q + kv, q + 2 * kv)), 'o_proj': ('o_proj', slice(None)),
                'gate_proj': ('gate_up', slice(0, inter)), 'up_proj': ('gate_up', slice(inter, 2 * inter)),
                'down_proj': ('down_proj', slice(None))}[projection]


def _apply(updates: Sequence[_Update], x: torch.Tensor, out: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
    if rows is not None:
        x = x[rows]
    for update in updates:
        change = (x @ update.a.T) @ update.b.T * update.scale
        if rows is None:
            out[:, update.columns] += change
        else:
            out[rows, update.columns] += change


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling for ``module``: ``lora_alpha`` (or its ``alpha_pattern`` entry) over r, or over sqrt(r)
    with rsLoRA."""
    alpha = config.get('lora_alpha', 8)
    for pattern, value in (config.get('alpha_pattern') or {}).items():
        if re.fullmatch(rf'(.*\.)?{pattern}', module):
            alpha = value
    return float(alpha) / (math.sqrt(rank) if config.get('use_rslora') else rank)
