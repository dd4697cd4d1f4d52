"""Load a Hugging Face model directory for the torch engine (safetensors only), on the runner that serves it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from twinkle_async.engines.torch.args import TorchEngineArgs
from twinkle_async.engines.torch.attention import register_attention
from twinkle_async.errors import ConfigurationError, EngineArgsError, NotSupportedError
from twinkle_async.models import require_safetensors

__all__ = ['load_model', 'resolve_device', 'resolve_dtype', 'model_max_len']

logger = logging.getLogger(__name__)

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise EngineArgsError(f'device: {exc}') from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == 'auto':
        return torch.bfloat16 if device.type == 'cuda' else torch.float32
    return _DTYPES[name]


def model_max_len(config: Any) -> int:
    """The longest sequence the model's positions allow (2048 when its config does not say)."""
    return getattr(config.get_text_config(), 'max_position_embeddings', None) or 2048


def load_model(model_dir: Path, args: TorchEngineArgs) -> tuple[Any, Any]:
    """Model (eval mode, no grads) and tokenizer from ``model_dir``: a
    :class:`~twinkle_async.engines.torch.native.model.NativeCausalLM` where ``args.runner`` allows and it serves
    the checkpoint, else the Hugging Face model.

    Raises:
        ConfigurationError: the directory has no safetensors weights or cannot be loaded.
        NotSupportedError: a vision-language model with multimodal rotary positions (M-RoPE).
        EngineArgsError: ``runner='native'`` for a checkpoint it does not serve (the reason named).
    """
    from transformers import AutoConfig, AutoTokenizer

    require_safetensors(model_dir)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    except Exception as exc:  # transformers raises OSError/ValueError; trusted remote code may raise anything
        raise ConfigurationError(f'cannot load the model in {model_dir}: {exc}') from exc
    if args.runner != 'hf':
        model = _native(model_dir, config, args, dtype, device)
        if model is not None:
            return model, tokenizer
    return _hugging_face(model_dir, config, args, dtype, device), tokenizer


def _native(model_dir: Path, config: Any, args: TorchEngineArgs, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import GenerationConfig

    from twinkle_async.engines.torch.native.checkpoint import load_native, unsupported_reason
    from twinkle_async.engines.torch.native.kernels import cpu_kernels

    max_len = model_max_len(config)
    reason = unsupported_reason(config, args.max_model_len or max_len)
    if reason is not None:
        if args.runner == 'native':
            raise EngineArgsError(f"runner='native' cannot serve {model_dir}: {reason} (runner='hf' can)")
        logger.info('torch engine: the Hugging Face runner serves %s (%s)', model_dir, reason)
        return None
    model = load_native(model_dir, config, dtype, device, args.max_model_len or max_len)
    if device.type == 'cpu':
        cpu_kernels()  # built (or found in torch's cache) here, off the event loop
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        model.generation_config = GenerationConfig.from_model_config(config)
    return model


def _hugging_face(model_dir: Path, config: Any, args: TorchEngineArgs, dtype: torch.dtype,
                  device: torch.device) -> Any:
    """The checkpoint's own Hugging Face class: a causal LM, or an image-text-to-text model (its vision tower runs in
    prefill)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    register_attention()
    vision = getattr(config, 'vision_config', None) is not None
    if vision and 'mrope_section' in (getattr(config.get_text_config(), 'rope_parameters', None) or {}):
        raise NotSupportedError(f'the torch engine does not compute the multimodal rotary positions (M-RoPE) of '
                                f'{config.model_type}: use the vllm engine')
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    try:
        model: Any = auto.from_pretrained(  # the class is the checkpoint's: known at run time only
            model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=args.trust_remote_code,
            attn_implementation=args.attn_implementation)
    except Exception as exc:  # transformers raises OSError/ValueError; trusted remote code may raise anything
        raise ConfigurationError(f'cannot load the model in {model_dir}: {exc}') from exc
    model.to(device).eval().requires_grad_(False)
    return model
