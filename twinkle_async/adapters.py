"""LoRA adapters as the engines take them: a PEFT config plus tensors, loaded from safetensors only."""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from twinkle_async.errors import InvalidAdapterError
from twinkle_async.weights import TensorSpec

__all__ = ['BASE_MODEL', 'PEFT_BASE', 'AdapterSpec', 'AdapterSource', 'load_adapter', 'check_fits', 'write_adapter',
           'CONFIG_FILE', 'WEIGHTS_FILE']

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
_NAME = re.compile(r'[A-Za-z0-9_-]{1,64}')

BASE_MODEL = ''
"""The adapter name that means the base model, no adapter (Twinkle's ``adapter_name=''``)."""
PEFT_BASE = '__base__'
"""PEFT's name for the base model in a mixed-adapter batch: no adapter may take it."""
_PICKLE_FILES = ('adapter_model.bin', 'adapter_model.pt', 'adapter_model.pth')

AdapterSource = Union[str, os.PathLike, Mapping[str, Any], Any]
"""A directory saved by PEFT's ``save_pretrained``, or a ``PeftConfig`` / config dict (then pass tensors)."""


@dataclass(slots=True)
class AdapterSpec:
    """A LoRA adapter: PEFT config dict and its tensors, keyed as PEFT saves them
    (``base_model.model.<module>.lora_A.weight``)."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def rank(self) -> int:
        return int(self.config['r'])

    def specs(self) -> dict[str, TensorSpec]:
        return {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in self.tensors.items()}


def load_adapter(name: str, source: AdapterSource, tensors: Optional[Mapping[str, torch.Tensor]] = None) -> AdapterSpec:
    """An :class:`AdapterSpec` from a PEFT directory or from a config plus tensors.

    Raises:
        InvalidAdapterError: no safetensors file (pickle checkpoints are refused), a config that is not
            LoRA, or tensors that are not LoRA A/B matrices.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == PEFT_BASE:
        raise InvalidAdapterError(f'adapter name must be letters, digits, "_" or "-", got {name!r}')
    if isinstance(source, (str, os.PathLike)):
        if tensors is not None:
            raise InvalidAdapterError('pass tensors only with a config, not with an adapter directory')
        config, tensors = _read_directory(Path(source))
    else:
        if tensors is None:
            raise InvalidAdapterError(f'adapter {name!r}: a config needs its tensors (a name -> tensor mapping)')
        config = _config_dict(source)
    spec = AdapterSpec(name, _lora_config(name, config),
                       {key: _tensor(name, key, value) for key, value in tensors.items()})
    _check_tensors(spec)
    return spec


def check_fits(spec: AdapterSpec, base: Mapping[str, TensorSpec]) -> None:
    """Every tensor adapts a linear weight of the model and has the shape LoRA needs for it.

    Raises:
        InvalidAdapterError: naming the first tensor that does not fit.
    """
    for key, tensor in spec.tensors.items():
        module = key.removeprefix('base_model.model.').replace('.lora_A.', '.').replace('.lora_B.', '.')
        weight = base.get(module)
        if weight is None or len(weight.shape) != 2:
            raise InvalidAdapterError(f'adapter {spec.name!r}: {key!r} adapts {module!r}, which is not a linear '
                                      'weight of the model')
        out_features, in_features = weight.shape
        expected = (spec.rank, in_features) if '.lora_A.' in key else (out_features, spec.rank)
        if tuple(tensor.shape) != expected:
            raise InvalidAdapterError(f'adapter {spec.name!r}: {key!r} has shape {tuple(tensor.shape)}, '
                                      f'expected {expected} for r={spec.rank}')


def write_adapter(spec: AdapterSpec, directory: Path) -> Path:
    """Save ``spec`` as PEFT does (config JSON + safetensors); files are replaced atomically."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / CONFIG_FILE, lambda path: path.write_text(json.dumps(spec.config, default=_jsonable)))
    _atomic_write(directory / WEIGHTS_FILE,
                  lambda path: save_file({k: v.contiguous() for k, v in spec.tensors.items()}, str(path)))
    return directory


def _read_directory(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not (directory / CONFIG_FILE).is_file():
        raise InvalidAdapterError(f'{directory} has no {CONFIG_FILE}: not a PEFT adapter directory')
    if not (directory / WEIGHTS_FILE).is_file():
        pickled = [p for p in _PICKLE_FILES if (directory / p).exists()]
        hint = f'; found {pickled[0]}, but pickle checkpoints are refused' if pickled else ''
        raise InvalidAdapterError(f'{directory} has no {WEIGHTS_FILE}{hint}')
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        return config, load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise InvalidAdapterError(f'cannot read the adapter in {directory}: {exc}') from exc


def _config_dict(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return {k: _plain(v) for k, v in source.items()}
    to_dict = getattr(source, 'to_dict', None)
    if to_dict is None:
        raise InvalidAdapterError(f'expected an adapter directory, a PeftConfig or a dict, got {type(source).__name__}')
    return {k: _plain(v) for k, v in to_dict().items() if v is not None}


def _tensor(name: str, key: object, value: object) -> torch.Tensor:
    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
        raise InvalidAdapterError(f'adapter {name!r}: tensors must map names to torch.Tensor, got {key!r}')
    return value.detach()


def _lora_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config with PEFT's defaults filled in (both engines then read the same values)."""
    from peft import LoraConfig

    if str(config.get('peft_type', 'LORA')).upper() != 'LORA':
        raise InvalidAdapterError(f'adapter {name!r}: only LoRA adapters are supported, '
                                  f'got peft_type={config.get("peft_type")!r}')
    rank = config.get('r')
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InvalidAdapterError(f'adapter {name!r}: r must be a positive int, got {rank!r}')
    if not config.get('target_modules'):
        raise InvalidAdapterError(f'adapter {name!r}: the config names no target_modules')
    alpha = config.get('lora_alpha', 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InvalidAdapterError(f'adapter {name!r}: lora_alpha must be a number, got {alpha!r}')
    if config.get('use_dora'):
        raise InvalidAdapterError(f'adapter {name!r}: DoRA (use_dora=True) is not supported, only plain LoRA')
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__ and k != 'peft_type'}
    try:
        full = LoraConfig(**fields).to_dict()
    except (TypeError, ValueError) as exc:
        raise InvalidAdapterError(f'adapter {name!r}: invalid LoRA config: {exc}') from exc
    return {k: _plain(v) for k, v in full.items()}


def _check_tensors(spec: AdapterSpec) -> None:
    if not spec.tensors:
        raise InvalidAdapterError(f'adapter {spec.name!r} has no tensors')
    for key, tensor in spec.tensors.items():
        if not ('.lora_A.' in key or '.lora_B.' in key) or not tensor.dtype.is_floating_point:
            raise InvalidAdapterError(f'adapter {spec.name!r}: {key!r} is not a floating-point LoRA A/B weight')


def _atomic_write(path: Path, write: Any) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    os.close(fd)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """JSON-ready config values: enums by value (``PeftType.LORA`` -> 'LORA'), sets as sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _jsonable(value: Any) -> Any:
    plain = _plain(value)
    return str(value) if plain is value else plain
