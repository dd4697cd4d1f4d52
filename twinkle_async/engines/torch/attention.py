"""Attention over the slot KV cache, shared by both runners; for Hugging Face models it is registered with
transformers as ``'twinkle'``.

HF's SDPA path repeats K/V for grouped-query attention whenever a mask is given, copying the whole
cache every decode step. Here a one-token decode folds each group's query heads into the query-length
axis (``[B, kv_heads, group, D]``) so every head reads its shared K/V in place; prefill uses SDPA's
``enable_gqa`` causally within each packed sequence (``bounds``), so no ``T x T`` mask is built. Results
equal the repeated-K/V computation.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ['ATTENTION_NAME', 'register_attention', 'causal_packed', 'grouped_decode']

ATTENTION_NAME = 'twinkle'


def causal_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: Sequence[int],
                  scale: Optional[float]) -> torch.Tensor:
    """``query [T, H, D]``, ``key/value [T, H_kv, D]``: causal attention within each packed sequence
    ``bounds[i]:bounds[i+1]``; returns ``[T, H, D]``."""
    gqa = query.shape[1] != key.shape[1]
    # 4-d [1, H, T, D]: SDPA's CPU flash kernel serves only batched inputs (3-d ones take the math path, ~7x slower)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end],
                                                              v[:, :, start:end], is_causal=True, scale=scale,
                                                              enable_gqa=gqa)
    return out[0].transpose(0, 1)


def grouped_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scale: Optional[float]) -> torch.Tensor:
    """``query [B, H, D]`` (one token per row), ``key/value [B, H_kv, L, D]``, additive ``mask [B, 1, 1, L]``;
    returns ``[B, H, D]``."""
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, dim)


def slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF's attention interface: ``query [B, H, Q, D]``, ``key/value [B, H_kv, L, D]``, additive
    ``attention_mask [B, 1, Q, L]``; returns ``[B, Q, H, D]``."""
    spans = kwargs.get('cu_seq_lens_q')
    if spans is not None:  # packed prefill, one row
        out = causal_packed(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                            spans.tolist(), scaling)
        return out.unsqueeze(0), None
    if query.shape[2] == 1 and attention_mask is not None:
        return grouped_decode(query[:, :, 0], key, value, attention_mask, scaling).unsqueeze(1), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make ``attn_implementation='twinkle'`` available to transformers models (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, slot_attention)
