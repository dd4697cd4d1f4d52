"""A trainer's logprobs under the sampler's logprob contract, and how far they are from the sampler's.

With top-k/top-p the sampler draws each token from the distribution renormalised over the kept tokens; a trainer
that takes a plain log-softmax of its logits is off by the log of the kept mass at every position, which biases
importance ratios (TRL #6789, vLLM #42259). :func:`trainer_logprobs` replays the sampler's processing — the
temperature and, with ``SamplingParams(return_sampling_mask=True)``, the kept set of every position — on the
trainer's own logits, so that the two agree exactly on the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from twinkle_async.data_format.outputs import SampledSequence
from twinkle_async.errors import InvalidRequestError

__all__ = ['trainer_logprobs', 'mismatch', 'Mismatch', 'sampler_logprobs']


def trainer_logprobs(logits: torch.Tensor, tokens: Union[Sequence[int], torch.Tensor], sequence: SampledSequence,
                     *, use_mask: bool = True) -> torch.Tensor:
    """Logprobs of ``tokens`` under ``logits`` processed as the sampler processed them for ``sequence``.

    Args:
        logits: ``[T, V]``, the trainer's logits at the positions that predicted the ``T`` completion tokens
            (for a causal LM on prompt + completion: rows ``len(prompt) - 1`` to ``-2``). Gradients flow.
        tokens: the ``T`` completion tokens (``sequence.tokens``).
        sequence: the sampler's sequence: its ``logprobs_mode``, ``temperature`` and ``sampling_mask`` say how.
        use_mask: renormalise over the sampler's kept tokens (needs ``sequence.sampling_mask``); ``False`` gives
            the temperature-scaled log-softmax over the whole vocabulary, what a trainer unaware of top-k/top-p
            computes.

    Returns:
        ``[T]`` float32 logprobs: the raw log-softmax for ``'raw_logprobs'`` sequences; for
        ``'processed_logprobs'`` ones, that of the distribution each token was drawn from (the repetition penalty
        is not replayed: sample RL rollouts without one).

    Raises:
        InvalidRequestError: shapes that do not match, or ``use_mask`` on a sequence sampled without a mask.
    """
    ids = torch.as_tensor(tokens, dtype=torch.long, device=logits.device)
    if logits.dim() != 2 or logits.shape[0] != ids.numel():
        raise InvalidRequestError(f'trainer_logprobs: logits must be [T, V] with T = {ids.numel()} tokens, got '
                                  f'{tuple(logits.shape)}')
    logits = logits.float()
    processed = sequence.logprobs_mode == 'processed_logprobs' and (sequence.temperature or 0) > 0
    if processed:
        logits = logits / float(sequence.temperature or 1.0)
        if use_mask:
            logits = logits + _mask_bias(sequence, logits)
    return torch.log_softmax(logits, dim=-1).gather(1, ids.unsqueeze(1)).squeeze(1)


def _mask_bias(sequence: SampledSequence, logits: torch.Tensor) -> torch.Tensor:
    """0 at every kept token, -inf elsewhere."""
    masks = sequence.sampling_mask
    if masks is None or len(masks) != logits.shape[0]:
        raise InvalidRequestError('trainer_logprobs(use_mask=True) needs the sequence sampled with '
                                  'SamplingParams(return_sampling_mask=True), one mask per token')
    bias = torch.full_like(logits, float('-inf'))
    for row, kept in enumerate(masks):
        bias[row, kept] = 0.0
    return bias


def sampler_logprobs(sequence: SampledSequence) -> list[float]:
    """The sampler's logprob of each token of ``sequence`` (sampled with ``logprobs`` set)."""
    if sequence.logprobs is None:
        raise InvalidRequestError('the sequence has no logprobs: sample with SamplingParams(logprobs=0)')
    return [row[0][1] for row in sequence.logprobs]


@dataclass(frozen=True)
class Mismatch:
    """Sampler vs trainer logprobs over ``tokens`` positions: ``max_abs`` / ``mean_abs`` of the difference, and
    ``mean_kl``, the k3 estimate of KL(sampler || trainer) (``E[exp(d) - 1 - d]``, ``d`` = trainer - sampler)."""

    tokens: int
    max_abs: float
    mean_abs: float
    mean_kl: float

    def __str__(self) -> str:
        return (f'{self.tokens} tokens: max |sampler - trainer| {self.max_abs:.3g}, mean {self.mean_abs:.3g}, '
                f'KL(sampler || trainer) ~ {self.mean_kl:.3g}')


def mismatch(sampler: Union[SampledSequence, Sequence[float], torch.Tensor],
             trainer: Union[Sequence[float], torch.Tensor]) -> Mismatch:
    """How far the trainer's logprobs are from the sampler's, position by position.

    Raises:
        InvalidRequestError: the two cover different numbers of tokens (or none).
    """
    ours = sampler_logprobs(sampler) if isinstance(sampler, SampledSequence) else sampler
    a = torch.as_tensor(ours, dtype=torch.float64).flatten()
    b = torch.as_tensor(trainer, dtype=torch.float64).detach().cpu().flatten()
    if a.numel() != b.numel() or a.numel() == 0:
        raise InvalidRequestError(f'mismatch: {a.numel()} sampler logprobs vs {b.numel()} trainer logprobs')
    difference = b - a
    kl = (difference.exp() - 1 - difference).mean().item()
    return Mismatch(a.numel(), difference.abs().max().item(), difference.abs().mean().item(),
                    kl if math.isfinite(kl) else math.inf)
