"""LoRA adapters on the torch engine: PEFT layers injected into the served model, one row per adapter.

Runs on the engine thread only (adding, removing and loading change the model's modules).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from twinkle_async.adapters import PEFT_BASE, AdapterSpec
from twinkle_async.errors import AdapterNotFoundError, InvalidAdapterError, WeightUpdateError
from twinkle_async.weights import NamedTensors, TensorSpec, conformed

__all__ = ['AdapterTensors', 'LoraAdapters']


class AdapterTensors:
    """Loaded adapters' A/B tensors by their PEFT-saved names (``params``), shared by both runners' adapters:
    what they are, checked staging of an update, and copying it in."""

    def __init__(self) -> None:
        self.params: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> PEFT-saved key -> tensor

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def specs(self, name: str) -> dict[str, TensorSpec]:
        """Raises AdapterNotFoundError: no adapter ``name``."""
        if name not in self.params:
            raise AdapterNotFoundError(f'adapter {name!r} is not loaded')
        return {key: TensorSpec(tuple(p.shape), p.dtype) for key, p in self.params[name].items()}

    def stage(self, name: str, tensors: NamedTensors, complete: bool = False) -> dict[str, torch.Tensor]:
        """Checked copies of ``tensors`` for adapter ``name`` (``complete``: every key must be there)."""
        specs = self.specs(name)
        staged = {key: t.clone() for key, t in conformed(tensors, specs, f'adapter {name!r}')}
        missing = sorted(set(specs) - set(staged)) if complete else []
        if missing:
            raise WeightUpdateError(f'adapter {name!r} is missing {len(missing)} tensor(s), e.g. {missing[0]!r}')
        return staged

    def load(self, name: str, staged: dict[str, torch.Tensor]) -> None:
        params = self.params[name]
        for key, tensor in staged.items():
            params[key].copy_(tensor)


class LoraAdapters(AdapterTensors):
    """The served model with zero or more LoRA adapters (PEFT); ``model`` is what the runner calls."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.base = model
        self.peft: Any = None

    @property
    def model(self) -> Any:
        return self.base if self.peft is None else self.peft

    @property
    def active(self) -> bool:
        return self.peft is not None

    def forward_kwargs(self, adapter_names: list[str], rows: int) -> dict[str, Any]:
        """PEFT's per-row adapter names for the first ``rows`` rows; nothing while no adapter is loaded."""
        if self.peft is None:
            return {}
        return {'adapter_names': [name or PEFT_BASE for name in adapter_names[:rows]]}

    def add(self, spec: AdapterSpec) -> None:
        """Load ``spec`` (replacing an adapter of the same name).

        Raises:
            InvalidAdapterError: the config does not fit the model or the tensors do not match it.
        """
        from peft import LoraConfig

        if spec.name in self.params:
            self.remove(spec.name)
        try:
            config = LoraConfig(**{k: v for k, v in spec.config.items() if k in LoraConfig.__dataclass_fields__})
            config.inference_mode = True
            if self.peft is None:
                from peft import PeftModel
                self.peft = PeftModel(self.base, config, adapter_name=spec.name)
            else:
                self.peft.add_adapter(spec.name, config)
        except (ValueError, TypeError, KeyError) as exc:
            self._discard(spec.name)
            raise InvalidAdapterError(f'adapter {spec.name!r} does not fit the model: {exc}') from exc
        self.peft.eval().requires_grad_(False)
        self.params[spec.name] = self._saved_keys(spec.name)
        try:
            self.load(spec.name, self.stage(spec.name, spec.tensors, complete=True))
        except WeightUpdateError as exc:
            self.remove(spec.name)
            raise InvalidAdapterError(str(exc)) from exc

    def remove(self, name: str) -> None:
        """Unload adapter ``name``; the model is plain again once the last one goes.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        if name not in self.params:
            raise AdapterNotFoundError(f'adapter {name!r} is not loaded')
        del self.params[name]
        self._discard(name)

    def _saved_keys(self, name: str) -> dict[str, torch.Tensor]:
        saved: dict[str, torch.Tensor] = {}
        for key, param in self.peft.named_parameters():
            for part in ('.lora_A.', '.lora_B.'):
                if f'{part}{name}.' in key:
                    saved[key.replace(f'{part}{name}.', part)] = param
        return saved

    def _discard(self, name: str) -> None:
        if self.peft is None or name not in self.peft.peft_config:
            return
        if len(self.peft.peft_config) == 1:
            self.base = self.peft.base_model.unload()
            self.peft = None
        else:
            with warnings.catch_warnings():  # "adapter x was active, now y is": we name adapters per row
                warnings.simplefilter('ignore', UserWarning)
                self.peft.delete_adapter(name)
