"""Load a Hugging Face model directory for the torch engine (safetensors only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from twinkle_async.engines.torch.args import TorchEngineArgs
from twinkle_async.engines.torch.attention import register_attention
from twinkle_async.errors import ConfigurationError, EngineArgsError
from twinkle_async.models import require_safetensors

__all__ = ['load_model', 'resolve_device', 'resolve_dtype']

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


def load_model(model_dir: Path, args: TorchEngineArgs) -> tuple[Any, Any]:
    """Model (eval mode, no grads) and tokenizer from ``model_dir``.

    Raises:
        ConfigurationError: the directory has no safetensors weights or cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_safetensors(model_dir)
    register_attention()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(  # the class is the checkpoint's: known at run time only
            model_dir, dtype=resolve_dtype(args.dtype, device), use_safetensors=True,
            trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation)
    except Exception as exc:  # transformers raises OSError/ValueError; trusted remote code may raise anything
        raise ConfigurationError(f'cannot load the model in {model_dir}: {exc}') from exc
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
