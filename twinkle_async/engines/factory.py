"""Build an engine by kind; the only place that knows which engines exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from twinkle_async.engines.base import Engine
from twinkle_async.errors import ConfigurationError, NotSupportedError

__all__ = ['ENGINE_KINDS', 'create_engine']

ENGINE_KINDS = ('torch', 'vllm')


async def create_engine(kind: str, model_dir: Path, engine_args: Optional[Mapping[str, Any]] = None) -> Engine:
    """Start an engine of ``kind`` ('torch' or 'vllm') on the model in ``model_dir``.

    Raises:
        ConfigurationError: an unknown kind.
        NotSupportedError: the engine's package is not installed.
        EngineArgsError: unknown or invalid ``engine_args``.
    """
    if kind == 'torch':
        from twinkle_async.engines.torch import TorchEngine
        return await TorchEngine.create(model_dir, engine_args)
    if kind == 'vllm':
        try:
            from twinkle_async.engines.vllm import VLLMEngine
        except ImportError as exc:
            raise NotSupportedError(f"engine='vllm' is not available here: {exc}") from exc
        return await VLLMEngine.create(model_dir, engine_args)
    raise ConfigurationError(f'unknown engine {kind!r}; choose one of {ENGINE_KINDS}')
