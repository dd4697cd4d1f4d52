"""Attention for the slot KV cache, registered with transformers as ``'twinkle'``.

HF's SDPA path repeats K/V for grouped-query attention whenever a mask is given, copying the whole
cache every decode step. Here a one-token decode folds each group's query heads into the query-length
axis (``[B, kv_heads, group, D]``) so every head reads its shared K/V in place; prefill uses SDPA's
``enable_gqa`` causally within each packed sequence (``cu_seq_lens_q`` bounds), so no ``T x T`` mask
is built. Results equal the repeated-K/V computation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ['ATTENTION_NAME', 'register_attention']

ATTENTION_NAME = 'twinkle'


def slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``query [B, H, Q, D]``, ``key/value [B, H_kv, L, D]``, additive ``attention_mask [B, 1, Q, L]``."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    spans = kwargs.get('cu_seq_lens_q')
    if spans is not None:
        return _packed_causal(query, key, value, spans.tolist(), scaling, group > 1), None
    if q_len == 1 and group > 1:
        grouped = query.reshape(batch, kv_heads, group, dim)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
        out = out.reshape(batch, heads, 1, dim)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=group > 1)
    return out.transpose(1, 2).contiguous(), None


def _packed_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                   scaling: Optional[float], gqa: bool) -> torch.Tensor:
    """Causal attention within each packed sequence ``bounds[i]:bounds[i+1]`` (no T x T mask)."""
    out = torch.empty_like(query)
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
            enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def register_attention() -> None:
    """Make ``attn_implementation='twinkle'`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
