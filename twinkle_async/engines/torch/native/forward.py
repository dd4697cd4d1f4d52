"""The native model's forward passes over the paged KV cache (the runner's :class:`Forward` for it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from twinkle_async.engines.torch.attention import causal_packed, grouped_decode
from twinkle_async.engines.torch.model_runner import MixedBatch
from twinkle_async.engines.torch.native.kernels import cpu_kernels
from twinkle_async.engines.torch.native.lora import NativeLora
from twinkle_async.engines.torch.native.model import NativeCausalLM
from twinkle_async.engines.torch.paged_cache import PagedKVCache

__all__ = ['NativeForward']


@dataclass(frozen=True, slots=True)
class _DecodeRows:
    """One step's decode rows, the same for every layer: row ``i`` in slot ``i`` at ``positions[i]``."""

    where: tuple[torch.Tensor, torch.Tensor]  # the cache's places for their new K/V
    lengths: torch.Tensor  # cached length each row attends to, itself included
    mask: torch.Tensor     # additive [rows, 1, 1, L], for SDPA when the kernel is not built

    @classmethod
    def of(cls, cache: PagedKVCache, positions: torch.Tensor, mask: Optional[torch.Tensor]) -> _DecodeRows:
        assert mask is not None
        slots = torch.arange(len(positions), device=positions.device)
        return cls(cache.locate(slots, positions), positions + 1, mask)


class NativeForward:
    """:class:`NativeCausalLM` with batched LoRA (:class:`NativeLora`) on :class:`PagedKVCache`; decode rows and
    prefill chunks run in one forward (:meth:`mixed`)."""

    chunked = True

    def __init__(self, model: NativeCausalLM, lora: NativeLora, cache: PagedKVCache) -> None:
        self.model, self.lora, self.cache = model, lora, cache
        shape = model.shape
        self.scale = shape.head_dim ** -0.5
        self.kernel = cpu_kernels() if model.embed_tokens.weight.device.type == 'cpu' else None
        # prompts attend over the paged cache in place with the kernel (bfloat16, AVX-512 BF16), else through SDPA
        self.prefill_kernel = (self.kernel is not None and model.dtype == torch.bfloat16
                               and self.kernel.has_prefill_attention(shape.head_dim, shape.heads // shape.kv_heads))

    def packed(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, bounds: list[int],
               keep: torch.Tensor, adapter: str, pixels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        if pixels is not None:
            raise ValueError('the native runner serves text-only models: it takes no images')
        where = self.cache.locate(slots, positions)
        spans = self._spans([(first, end, int(slots[first]), int(positions[first]))
                             for first, end in zip(bounds[:-1], bounds[1:])])

        def attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            self.cache.write(layer, where, key, value)
            if spans is not None:
                return self._prefill_attention(layer, query, spans).reshape(len(query), -1)
            return causal_packed(query, key, value, bounds, self.scale).reshape(len(query), -1)

        hidden = self.model(input_ids, positions, attention, self.lora.delta([adapter]))
        return self.model.logits(hidden[keep])

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               adapters: Sequence[str]) -> torch.Tensor:
        rows = _DecodeRows.of(self.cache, positions, mask)

        def attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            return self._decode_attention(layer, query, key, value, rows).reshape(len(query), -1)

        hidden = self.model(input_ids, positions, attention, self.lora.delta(adapters))
        return self.model.logits(hidden)

    def mixed(self, batch: MixedBatch) -> torch.Tensor:
        rows = batch.rows
        decode_rows = _DecodeRows.of(self.cache, batch.positions[:rows], batch.decode_mask) if rows else None
        chunk_where = self.cache.locate(batch.chunk_slots, batch.positions[rows:])
        spans = self._spans(batch.chunks)

        def attention(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            parts = []
            if decode_rows is not None:
                parts.append(self._decode_attention(layer, query[:rows], key[:rows], value[:rows], decode_rows))
            if len(query) > rows:
                self.cache.write(layer, chunk_where, key[rows:], value[rows:])
                if spans is not None:
                    parts.append(self._prefill_attention(layer, query, spans)[rows:])
                else:
                    parts += [self._chunk_attention(layer, query, key, value, *span) for span in batch.chunks]
            return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(len(query), -1)

        hidden = self.model(batch.input_ids, batch.positions, attention, self.lora.delta(batch.adapters))
        return self.model.logits(hidden[batch.keep])

    def _decode_attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          rows: _DecodeRows) -> torch.Tensor:
        self.cache.write(layer, rows.where, key, value)
        if self.kernel is not None:  # each row reads its own length from its blocks in place
            return self.kernel.decode_attention(query, self.cache.keys[layer], self.cache.values[layer],
                                                self.cache.tables, rows.lengths, self.scale, torch.get_num_threads())
        keys, values = self.cache.gather_rows(layer, len(query), rows.mask.shape[-1])
        return grouped_decode(query, keys, values, rows.mask, self.scale)

    def _spans(self, chunks: Sequence[tuple[int, int, int, int]]) -> Optional[torch.Tensor]:
        """``(first row, end row, slot, start position)`` per prompt part, for the prefill kernel (``None``: SDPA)."""
        if not self.prefill_kernel or not chunks:
            return None
        return torch.tensor(chunks, dtype=torch.long)

    def _prefill_attention(self, layer: int, query: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Each span's rows over their slot's cached positions up to their own (already written), in place;
        ``[T, H, D]``."""
        assert self.kernel is not None
        return self.kernel.prefill_attention(query, self.cache.keys[layer], self.cache.values[layer],
                                             self.cache.tables, spans, self.scale)

    def _chunk_attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         first: int, end: int, slot: int, start: int) -> torch.Tensor:
        """Causal attention of prompt positions ``start..`` (pack tokens ``first:end``) over everything cached
        before them in ``slot`` and themselves; ``[end - first, H, D]``."""
        if start == 0:
            return causal_packed(query[first:end], key[first:end], value[first:end], [0, end - first], self.scale)
        length = start + end - first
        keys, values = (part.unsqueeze(0) for part in self.cache.gather(layer, slot, length))
        seen = torch.arange(length, device=query.device) <= torch.arange(start, length, device=query.device)[:, None]
        out = F.scaled_dot_product_attention(query[first:end].transpose(0, 1).unsqueeze(0), keys, values,
                                             attn_mask=seen, scale=self.scale,
                                             enable_gqa=query.shape[1] != keys.shape[1])
        return out[0].transpose(0, 1)
