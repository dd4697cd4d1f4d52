"""What sampling returns: ``SampleResponse`` / ``SampledSequence`` (one-shot) and ``TokenDelta`` (streams)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

__all__ = ['StopReason', 'LogprobRow', 'SampledSequence', 'SampleResponse', 'TokenDelta']

StopReason = Literal['length', 'stop', 'abort', 'error']
LogprobRow = list[tuple[int, float]]
"""One position: ``(sampled_token_id, logprob)`` first, then the top-k ``(token_id, logprob)`` sorted."""


class SampledSequence(BaseModel):
    """One completion.

    ``tokens`` are the generated ids (a stop token is included, the stop string's text is not in
    ``decoded`` unless asked for; a stop string that ends inside a token keeps that whole token in
    ``tokens``, so text after the stop string may be in ``tokens`` but not in ``decoded``, as in vLLM).
    ``logprobs[i][0]`` is always the sampled token ``tokens[i]``.
    ``new_input_feature`` is the input continued by this completion (an ``InputFeature``: every key of the
    input, ``input_ids`` = prompt + completion, Twinkle's rolled ``labels``, ``attention_mask``, ``position_ids``,
    ``length``, and with ``messages`` the completion appended as an assistant message with parsed ``tool_calls``)
    for token-in/token-out multi-turn use and training.
    ``weight_versions[i]`` is the version of the weights that sampled ``tokens[i]`` (two versions
    appear when a rollout was kept across a weight update).

    The logprob contract: ``logprobs_mode`` says how ``logprobs`` were computed — ``'raw_logprobs'``, the model's
    log-softmax, or ``'processed_logprobs'``, that of the distribution the token was drawn from (after the
    repetition penalty, ``temperature``, ``top_k`` and ``top_p``, renormalised over the kept tokens) — and
    ``temperature`` / ``top_k`` / ``top_p`` are the effective settings (0 / -1 / 1.0 when off; greedy is
    temperature 0). With ``return_sampling_mask``, ``sampling_mask[i]`` holds the sorted ids the sampler could
    have drawn at position ``i`` (the kept set; ``[tokens[i]]`` when greedy); ``twinkle_async.rl`` recomputes a
    trainer's logprobs under the same processing and mask.
    """

    model_config = ConfigDict(extra='forbid')

    stop_reason: StopReason
    tokens: list[int]
    logprobs: Optional[list[LogprobRow]] = None
    decoded: Optional[str] = None
    new_input_feature: Optional[dict[str, Any]] = None
    weight_versions: Optional[list[int]] = None
    logprobs_mode: Optional[Literal['raw_logprobs', 'processed_logprobs']] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    sampling_mask: Optional[list[list[int]]] = None


class SampleResponse(BaseModel):
    """All completions of one input, in sample order.

    ``prompt_logprobs[i]`` is the logprob of prompt token ``i`` given the tokens before it (``None``
    for the first); ``topk_prompt_logprobs[i]`` holds the top-k alternatives at that position.
    """

    model_config = ConfigDict(extra='forbid')

    sequences: list[SampledSequence]
    prompt_token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    topk_prompt_logprobs: Optional[list[Optional[LogprobRow]]] = None


@dataclass(slots=True)
class TokenDelta:
    """New tokens of one sample of a streamed request.

    Attributes:
        index: which of the ``num_samples`` samples these tokens belong to.
        token_ids: new token ids (possibly several when the consumer lagged).
        logprobs: one row per new token (sampled first), or ``None`` when not asked for.
        text: new decoded text (never a broken multi-byte character).
        finish_reason: set on the sample's last delta: 'stop', 'length' or 'abort'.
        weight_version: the version of the weights that sampled these tokens.
        sampling_mask: with ``return_sampling_mask``, per new token the ids it could have been drawn from.
    """

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[LogprobRow]] = None
    text: str = ''
    finish_reason: Optional[StopReason] = None
    weight_version: int = 0
    sampling_mask: Optional[list[list[int]]] = None
