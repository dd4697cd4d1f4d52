"""LoRA adapters on the vLLM engine: each one saved in an engine-owned directory and served by a ``LoRARequest``.

An adapter's weights are updated in place: its files are rewritten and vLLM drops the loaded copy,
so the workers load the new files at its next use, under the same id (requests in flight included).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from twinkle_async.adapters import AdapterSpec, write_adapter
from twinkle_async.errors import AdapterNotFoundError, InvalidAdapterError, NotSupportedError
from twinkle_async.weights import NamedTensors, conformed, stage_update

__all__ = ['LoraRegistry']


class LoraRegistry:
    """Adapter name -> (``LoRARequest``, the adapter's current tensors)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.config = llm.vllm_config.lora_config
        self.requests: dict[str, Any] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self._ids = itertools.count(1)
        self._root: Optional[Path] = None

    @property
    def names(self) -> list[str]:
        return list(self.requests)

    def request_for(self, name: str) -> Any:
        if not name:
            return None
        if name not in self.requests:
            raise AdapterNotFoundError(f'adapter {name!r} is not loaded')
        return self.requests[name]

    async def add(self, spec: AdapterSpec) -> None:
        """Save ``spec`` and load it into vLLM under a fresh id (no stale prefix-cache entry can match it).

        Raises:
            NotSupportedError: the engine was started with ``enable_lora=False``.
            InvalidAdapterError: its rank is over ``max_lora_rank`` or vLLM cannot load it.
        """
        from vllm.lora.request import LoRARequest

        self._check_fits(spec)
        if spec.name in self.requests:
            await self.remove(spec.name)
        lora_id = next(self._ids)
        path = self._directory() / f'{spec.name}-{lora_id}'
        await asyncio.to_thread(write_adapter, spec, path)
        request = LoRARequest(f'{spec.name}-{lora_id}', lora_id, str(path))
        try:
            await self.llm.add_lora(request)
        except Exception as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise InvalidAdapterError(f'vllm cannot load adapter {spec.name!r}: {exc}') from exc
        self.requests[spec.name], self.specs[spec.name] = request, spec

    async def remove(self, name: str) -> None:
        request = self.request_for(name)
        del self.requests[name], self.specs[name]
        await self.llm.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    async def stage(self, name: str, weights: NamedTensors) -> dict[str, torch.Tensor]:
        """Checked new tensors for adapter ``name`` (any subset of its tensors)."""
        self.request_for(name)
        specs = self.specs[name].specs()
        return await stage_update(lambda: {key: t.clone() for key, t in conformed(weights, specs, f'adapter {name!r}')})

    async def apply(self, name: str, staged: dict[str, torch.Tensor]) -> None:
        """Rewrite the adapter's files and drop vLLM's loaded copy (call with generation paused)."""
        spec = self.specs[name]
        updated = AdapterSpec(name, spec.config, {**spec.tensors, **staged})
        request = self.requests[name]
        await asyncio.to_thread(write_adapter, updated, Path(request.lora_path))
        await self.llm.remove_lora(request.lora_int_id)
        self.specs[name] = updated

    def cleanup(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def _check_fits(self, spec: AdapterSpec) -> None:
        if self.config is None:
            raise NotSupportedError('this vllm engine was started with enable_lora=False: it cannot serve adapters')
        if spec.rank > self.config.max_lora_rank:
            raise InvalidAdapterError(f'adapter {spec.name!r} has rank {spec.rank}, over the engine\'s '
                                      f'max_lora_rank={self.config.max_lora_rank} (an engine_args key)')
        served = self.config.target_modules
        for key in spec.tensors:
            module = key.split('.lora_')[0].rsplit('.', 1)[-1]
            if served is not None and module not in served:
                raise InvalidAdapterError(f'adapter {spec.name!r} adapts {module!r}, which this engine does not '
                                          f'serve LoRA on (lora_target_modules={served})')

    def _directory(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix='twinkle-async-lora-'))
        return self._root
