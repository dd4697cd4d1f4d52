"""The Llama family (Llama, Mistral, Qwen2, Qwen3) as one small module on packed tokens, with fused layouts.

Every sequence of a step is packed into one row of ``T`` tokens (``[T, hidden]``, no batch axis, no padding);
attention is delegated to an :class:`Attention` the runner plans per step (it owns the KV cache). The query, key
and value projections are one GEMM (``qkv``), gate and up are one (``gate_up``); the rotary table is computed
once for every position. The element-wise steps (RMSNorm with its residual add, rotary, the gated activation) run
through the model's :class:`~twinkle_async.engines.torch.native.ops.TorchOps` (fused CPU kernels for half
precision). Numerics follow the Hugging Face modules op for op (float32 RMSNorm, cos/sin in the model's dtype), so
float32 outputs match them to rounding.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from twinkle_async.engines.torch.native.ops import TorchOps

__all__ = ['NativeCausalLM', 'Attention', 'LoraDelta', 'ModelShape']

LoraDelta = Callable[[int, str, torch.Tensor, torch.Tensor], None]
"""``(layer, projection, input, output)``: adds the batch's LoRA updates for one fused projection in place."""


class Attention(Protocol):
    """Stores ``key``/``value`` ``[T, kv_heads, head_dim]`` of layer ``layer`` in the cache and returns the
    attention output ``[T, heads * head_dim]`` of ``query`` ``[T, heads, head_dim]`` over what each token sees."""

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor: ...


class ModelShape:
    """What the layers need from a Hugging Face config of the family."""

    def __init__(self, config: Any) -> None:
        model_type = config.model_type
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, 'head_dim', None) or self.hidden // self.heads
        self.intermediate = config.intermediate_size
        self.layers = config.num_hidden_layers
        self.vocab = config.vocab_size
        self.eps = config.rms_norm_eps
        self.activation = config.hidden_act
        self.tied = bool(getattr(config, 'tie_word_embeddings', False))
        attention_bias = bool(getattr(config, 'attention_bias', False))
        self.qkv_bias = True if model_type == 'qwen2' else attention_bias
        self.o_bias = False if model_type == 'qwen2' else attention_bias
        self.mlp_bias = bool(getattr(config, 'mlp_bias', False))
        self.qk_norm = model_type == 'qwen3'

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


class RMSNorm(nn.Module):
    """An RMSNorm's weight and epsilon; :meth:`TorchOps.rms_norm` applies it."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def normalize(self, ops: TorchOps, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, residual)


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, index: int) -> None:
        super().__init__()
        self.index, self.shape = index, shape
        self.input_layernorm = RMSNorm(shape.hidden, shape.eps)
        self.qkv = nn.Linear(shape.hidden, shape.q_size + 2 * shape.kv_size, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(shape.q_size, shape.hidden, bias=shape.o_bias)
        self.q_norm = RMSNorm(shape.head_dim, shape.eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(shape.head_dim, shape.eps) if shape.qk_norm else None
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.eps)
        self.gate_up = nn.Linear(shape.hidden, 2 * shape.intermediate, bias=shape.mlp_bias)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=shape.mlp_bias)
        self.act = _activation(shape.activation)

    def forward(self, hidden: torch.Tensor, pending: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                attention: Attention, lora: Optional[LoraDelta],
                ops: TorchOps) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, pending)`` after this layer, for ``hidden`` ``[T, hidden]`` plus the previous layer's
        ``pending`` output (added in place by this layer's first norm, as the next layer's adds this one's)."""
        shape = self.shape
        x = self.input_layernorm.normalize(ops, hidden, pending)
        qkv = self._linear(ops, self.qkv, 'qkv', x, lora)
        q, k, v = qkv.split([shape.q_size, shape.kv_size, shape.kv_size], dim=-1)
        q = q.view(-1, shape.heads, shape.head_dim)
        k = k.view(-1, shape.kv_heads, shape.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm.normalize(ops, q), self.k_norm.normalize(ops, k)
        q, k = ops.rotate(q, cos, sin), ops.rotate(k, cos, sin)
        out = attention(self.index, q, k, v.view(-1, shape.kv_heads, shape.head_dim))
        x = self.post_attention_layernorm.normalize(ops, hidden, self._linear(ops, self.o_proj, 'o_proj', out, lora))
        gated = ops.act_mul(self._linear(ops, self.gate_up, 'gate_up', x, lora), self.act)
        return hidden, self._linear(ops, self.down_proj, 'down_proj', gated, lora)

    def _linear(self, ops: TorchOps, linear: nn.Linear, name: str, x: torch.Tensor,
                lora: Optional[LoraDelta]) -> torch.Tensor:
        out = ops.linear(x, linear)
        if lora is not None:
            lora(self.index, name, x, out)
        return out


class NativeCausalLM(nn.Module):
    """A Llama-family causal LM on packed tokens; ``config`` is the checkpoint's Hugging Face config."""

    def __init__(self, config: Any, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.shape = shape = ModelShape(config)
        self.embed_tokens = nn.Embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(DecoderLayer(shape, i) for i in range(shape.layers))
        self.norm = RMSNorm(shape.hidden, shape.eps)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)
        if shape.tied:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_positions = max_positions
        self.register_buffer('cos', torch.empty(0), persistent=False)
        self.register_buffer('sin', torch.empty(0), persistent=False)
        self.generation_config: Any = None
        self.ops = TorchOps()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def build_rotary_table(self) -> None:
        """cos/sin for positions ``0..max_positions-1``, computed by the family's own rotary module."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        device = self.embed_tokens.weight.device
        rotary = LlamaRotaryEmbedding(self.config).to(device)
        positions = torch.arange(self.max_positions, device=device).unsqueeze(0)
        cos, sin = rotary(torch.empty(0, device=device, dtype=self.dtype), positions)
        self.cos, self.sin = cos[0], sin[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention,
                lora: Optional[LoraDelta] = None) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` of the packed tokens ``input_ids`` at ``positions``."""
        hidden, pending = self.embed_tokens(input_ids), None
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in self.layers:
            hidden, pending = layer(hidden, pending, cos, sin, attention, lora, self.ops)
        return self.norm.normalize(self.ops, hidden, pending)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN
    act = ACT2FN[name]
    return F.silu if name == 'silu' else act
