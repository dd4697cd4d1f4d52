"""Batched token selection: penalties, temperature, top-k/top-p, per-sample generators, logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from twinkle_async.engines.torch.native.kernels import cpu_kernels
from twinkle_async.engines.torch.slots import SlotTable

__all__ = ['BatchFlags', 'SampledBatch', 'sample_tokens']

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class BatchFlags:
    """Which (costly) steps this batch needs; computed once per step from the running samples."""

    any_penalty: bool
    all_greedy: bool
    any_top_k_top_p: bool
    max_logprobs: int  # -1: nobody wants logprobs
    processed_logprobs: bool = False  # logprobs of the distribution sampled from, not the model's raw ones
    logprob_rows: Optional[torch.Tensor] = None  # the rows that want logprobs, when not all of them do
    mask_rows: tuple[int, ...] = ()  # the rows that want their sampling mask


@dataclass(slots=True)
class SampledBatch:
    tokens: torch.Tensor                     # [B]
    token_logprobs: Optional[torch.Tensor]   # [B] raw logprob of each sampled token
    top_ids: Optional[torch.Tensor]          # [B, k]
    top_logprobs: Optional[torch.Tensor]     # [B, k]
    masks: Optional[dict[int, list[int]]] = None  # row -> the sorted ids it could have drawn


def sample_tokens(logits: torch.Tensor, table: SlotTable, rows: slice, flags: BatchFlags) -> SampledBatch:
    """Pick one token per row of ``logits`` ([B, V], rows ``rows`` of the slot table).

    Logprobs (when asked for) are the model's raw log-softmax, or with ``flags.processed_logprobs`` those of the
    distribution each row sampled from: after the penalty, temperature and top-k/top-p, renormalised (greedy
    rows: after the penalty), as vLLM's ``processed_logprobs``. They are computed only for ``flags.logprob_rows``
    (others get zeros) when that is given.
    """
    want_logprobs = flags.max_logprobs >= 0
    if flags.all_greedy and not (want_logprobs or flags.any_penalty or flags.mask_rows):
        return SampledBatch(_argmax(logits), None, None, None)  # in the model's dtype: the same argmax
    logits = logits.float()
    asking = flags.logprob_rows
    logprobs = None
    if want_logprobs and not flags.processed_logprobs:
        logprobs = torch.log_softmax(logits if asking is None else logits[asking], dim=-1)
    if flags.any_penalty:
        logits = _apply_repetition_penalty(logits, table.seen[rows], table.penalty[rows])
    tokens = _argmax(logits)
    scaled = None
    if not flags.all_greedy:
        scaled = logits / table.temperature[rows].unsqueeze(1)
        if flags.any_top_k_top_p:
            scaled = _apply_top_k_top_p(scaled, table.top_k[rows], table.top_p[rows])
        sampled = _exponential_race(scaled.softmax(dim=-1), table, rows)
        tokens = torch.where(table.greedy[rows], tokens, sampled)
    masks = _sampling_masks(flags.mask_rows, tokens, scaled, table.greedy[rows]) if flags.mask_rows else None
    if want_logprobs and flags.processed_logprobs:
        greedy = table.greedy[rows]
        if asking is not None:
            logits, scaled, greedy = logits[asking], None if scaled is None else scaled[asking], greedy[asking]
        logprobs = _processed_logprobs(logits, scaled, greedy)
    if asking is None:
        batch = _with_logprobs(tokens, logprobs, flags.max_logprobs)
    else:
        batch = _scattered(_with_logprobs(tokens[asking], logprobs, flags.max_logprobs), tokens, asking)
    batch.masks = masks
    return batch


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest logit; on CPU by the native kernel (one vectorised pass; ``torch.argmax`` takes
    ~10x as long over a vocabulary of 49k)."""
    kernels = cpu_kernels() if logits.device.type == 'cpu' and logits.dtype in _KERNEL_DTYPES else None
    return kernels.argmax(logits.contiguous()) if kernels is not None else logits.argmax(dim=-1)


def _sampling_masks(mask_rows: tuple[int, ...], tokens: torch.Tensor, scaled: Optional[torch.Tensor],
                    greedy: torch.Tensor) -> dict[int, list[int]]:
    """Per row asking: the ids left after top-k/top-p (ascending), or the token alone for a greedy row."""
    masks = {}
    for row in mask_rows:
        if scaled is None or bool(greedy[row]):
            masks[row] = [int(tokens[row])]
        else:
            masks[row] = torch.isfinite(scaled[row]).nonzero().flatten().tolist()
    return masks


def _processed_logprobs(logits: torch.Tensor, scaled: Optional[torch.Tensor], greedy: torch.Tensor) -> torch.Tensor:
    penalized = torch.log_softmax(logits, dim=-1)
    if scaled is None:
        return penalized
    return torch.where(greedy.unsqueeze(1), penalized, torch.log_softmax(scaled, dim=-1))


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    penalty = penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


_NUCLEUS_CANDIDATES = 1024
"""Where rows with top-p but no top-k look for their nucleus before the whole vocabulary is sorted."""


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p (over the top-k renormalised distribution) drop, per row.

    The kept tokens are found among the largest ``max(top_k)`` logits (``topk``, no vocabulary sort; the top-p
    mass summed in float64); rows without top-k look among the largest 1,024, and the whole vocabulary is
    sorted only when a nucleus is larger still.
    """
    vocab = logits.shape[-1]
    k_max = int(top_k.max())
    threshold = _threshold_among(logits, top_k, top_p, min(k_max if k_max < vocab else _NUCLEUS_CANDIDATES, vocab))
    if threshold is None:
        return _sorted_top_k_top_p(logits, top_k, top_p)
    return logits.masked_fill(logits < threshold.unsqueeze(1), float('-inf'))


def _threshold_among(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     candidates: int) -> Optional[torch.Tensor]:
    """Each row's smallest kept logit, found among its ``candidates`` largest; ``None`` when some row may keep
    tokens beyond them."""
    vocab = logits.shape[-1]
    whole = top_k >= vocab  # rows without top-k: renormalised over the whole vocabulary
    if bool(((top_k > candidates) & ~whole).any()):
        return None
    values = logits.topk(candidates, dim=-1).values  # descending
    in_k = torch.arange(candidates, device=logits.device).unsqueeze(0) < top_k.unsqueeze(1)
    masked = values.masked_fill(~in_k, float('-inf')).double()
    normalizer = torch.where(whole, logits.logsumexp(dim=-1).double(), masked.logsumexp(dim=-1))
    probs = (masked - normalizer.unsqueeze(1)).exp()
    if bool((whole & (top_p < 1) & (probs.sum(dim=-1) < top_p)).any()):
        return None
    keep = in_k & (probs.cumsum(dim=-1) - probs < top_p.double().unsqueeze(1))  # the mass before it is under top_p
    keep[:, 0] = True
    threshold = values.masked_fill(~keep, float('inf')).min(dim=-1).values
    return threshold.masked_fill(whole & (top_p >= 1), float('-inf'))


def _sorted_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float('-inf'))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float('-inf'))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_race(probs: torch.Tensor, table: SlotTable, rows: slice) -> torch.Tensor:
    """Sample ``argmax(p / q)`` with ``q ~ Exp(1)``; a seeded sample draws ``q`` from its own generator."""
    noise = torch.empty_like(probs).exponential_(generator=table.shared_generator)
    for offset, generator in enumerate(table.generators[rows]):
        if generator is not None:
            noise[offset].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def _scattered(part: SampledBatch, tokens: torch.Tensor, rows: torch.Tensor) -> SampledBatch:
    """``part`` (logprobs of ``rows`` only) as a batch of every row's ``tokens``, zeros where no row asked."""
    def spread(values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if values is None:
            return None
        full = values.new_zeros((len(tokens), *values.shape[1:]))
        full[rows] = values
        return full
    return SampledBatch(tokens, spread(part.token_logprobs), spread(part.top_ids), spread(part.top_logprobs))


def _with_logprobs(tokens: torch.Tensor, raw: Optional[torch.Tensor], k: int) -> SampledBatch:
    if raw is None:
        return SampledBatch(tokens, None, None, None)
    token_logprobs = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if k == 0:
        return SampledBatch(tokens, token_logprobs, None, None)
    top_logprobs, top_ids = raw.topk(k, dim=-1)
    return SampledBatch(tokens, token_logprobs, top_ids, top_logprobs)
