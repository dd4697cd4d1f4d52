"""Which checkpoints the native runner serves, and loading them from safetensors into its fused layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

import torch

from twinkle_async.engines.torch.native.model import DecoderLayer, NativeCausalLM
from twinkle_async.engines.torch.native.ops import layer_ops
from twinkle_async.engines.torch.weight_store import WeightSlot
from twinkle_async.errors import ConfigurationError

__all__ = ['unsupported_reason', 'load_native', 'weight_slots']

FAMILY = ('llama', 'mistral', 'qwen2', 'qwen3')
_POSITION_DEPENDENT_ROPE = ('dynamic', 'longrope')


def unsupported_reason(config: Any, max_model_len: int) -> Optional[str]:
    """Why the native runner cannot serve ``config`` (``None`` when it can)."""
    from transformers.activations import ACT2FN

    if config.model_type not in FAMILY:
        return f'model type {config.model_type!r} is not one of {FAMILY}'
    rope = (getattr(config, 'rope_parameters', None) or {}).get('rope_type', 'default')
    if rope in _POSITION_DEPENDENT_ROPE:
        return f'rope_type {rope!r} changes with the sequence length'
    window = getattr(config, 'sliding_window', None)
    if getattr(config, 'use_sliding_window', True) and window and window < max_model_len:
        return f'sliding_window={window} is below max_model_len={max_model_len}'
    if config.hidden_act not in ACT2FN:
        return f'activation {config.hidden_act!r} is unknown'
    return None


def weight_slots(model: NativeCausalLM) -> dict[str, WeightSlot]:
    """Checkpoint name -> where it lives in ``model`` (q/k/v rows of ``qkv``, gate/up rows of ``gate_up``)."""
    shape = model.shape
    slots = {'model.embed_tokens.weight': WeightSlot.of(model.embed_tokens.weight),
             'lm_head.weight': WeightSlot.of(model.lm_head.weight),
             'model.norm.weight': WeightSlot.of(model.norm.weight)}
    q, kv, inter = shape.q_size, shape.kv_size, shape.intermediate
    for i, module in enumerate(model.layers):
        layer = cast(DecoderLayer, module)
        prefix = f'model.layers.{i}.'
        fused = {'self_attn.q_proj': (layer.qkv, slice(0, q)), 'self_attn.k_proj': (layer.qkv, slice(q, q + kv)),
                 'self_attn.v_proj': (layer.qkv, slice(q + kv, q + 2 * kv)),
                 'mlp.gate_proj': (layer.gate_up, slice(0, inter)),
                 'mlp.up_proj': (layer.gate_up, slice(inter, 2 * inter))}
        for name, (linear, rows) in fused.items():
            slots[f'{prefix}{name}.weight'] = WeightSlot.of(linear.weight, rows)
            if linear.bias is not None:
                slots[f'{prefix}{name}.bias'] = WeightSlot.of(linear.bias, rows)
        whole = {'self_attn.o_proj': layer.o_proj, 'mlp.down_proj': layer.down_proj}
        for name, linear in whole.items():
            slots[f'{prefix}{name}.weight'] = WeightSlot.of(linear.weight)
            if linear.bias is not None:
                slots[f'{prefix}{name}.bias'] = WeightSlot.of(linear.bias)
        norms = {'input_layernorm': layer.input_layernorm, 'post_attention_layernorm': layer.post_attention_layernorm,
                 'self_attn.q_norm': layer.q_norm, 'self_attn.k_norm': layer.k_norm}
        for name, norm in norms.items():
            if norm is not None:
                slots[f'{prefix}{name}.weight'] = WeightSlot.of(norm.weight)
    return slots


def load_native(model_dir: Path, config: Any, dtype: torch.dtype, device: torch.device,
                max_positions: int) -> NativeCausalLM:
    """The checkpoint in ``model_dir`` (safetensors) as a :class:`NativeCausalLM` on ``device`` in ``dtype``.

    Raises:
        ConfigurationError: a weight the model does not have, or one it needs that the checkpoint lacks.
    """
    from safetensors import safe_open

    with torch.device('meta'):
        model = NativeCausalLM(config, max_positions)
    model = model.to_empty(device=device).to(dtype)
    if model.shape.tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.eval().requires_grad_(False)
    slots = weight_slots(model)
    loaded: set[str] = set()
    for file in sorted(model_dir.glob('*.safetensors')):
        with safe_open(str(file), framework='pt', device=str(device)) as tensors:
            for name in tensors.keys():
                if name not in slots:
                    if name.endswith('rotary_emb.inv_freq'):
                        continue
                    raise ConfigurationError(f'{file.name}: weight {name!r} is not part of a {config.model_type} model')
                target = slots[name].target()
                tensor = tensors.get_tensor(name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ConfigurationError(f'{file.name}: {name!r} has shape {tuple(tensor.shape)}, the config '
                                             f'says {tuple(target.shape)}')
                target.copy_(tensor)
                loaded.add(name)
    missing = sorted(set(slots) - loaded - ({'lm_head.weight'} if model.shape.tied else set()))
    if missing:
        raise ConfigurationError(f'the checkpoint in {model_dir} lacks {len(missing)} weight(s), e.g. {missing[0]!r}')
    model.build_rotary_table()
    model.ops = layer_ops(dtype, device)
    return model
