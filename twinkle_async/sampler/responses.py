"""Pure response building: engine outputs -> ``SampledSequence`` / ``SampleResponse`` / ``TokenDelta``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from twinkle_async.data_format.outputs import LogprobRow, SampledSequence, SampleResponse, TokenDelta
from twinkle_async.engines.base import EngineOutput
from twinkle_async.template.features import plain_copy

__all__ = ['ResponseBuilder', 'LogprobContract', 'Continuation', 'to_delta', 'empty_response']

Continuation = Callable[[list[int]], Any]
"""Completion tokens -> that sample's ``new_input_feature`` (the template's ``concat_input_feature``)."""


def to_delta(output: EngineOutput) -> TokenDelta:
    return TokenDelta(output.index, output.token_ids, output.logprobs, output.text, output.finish_reason,
                      output.weight_version, output.sampling_masks)


@dataclass(frozen=True)
class LogprobContract:
    """How a request's logprobs were computed (see ``SampledSequence``): the engine's mode, the effective
    settings."""

    logprobs_mode: str
    temperature: float
    top_k: int
    top_p: float

    @classmethod
    def of(cls, logprobs_mode: str, params: Any) -> LogprobContract:
        return cls(logprobs_mode, params.temperature, params.top_k, params.top_p)


class ResponseBuilder:
    """Accumulates one request's outputs (any sample order) into a ``SampleResponse``."""

    def __init__(self, prompt_token_ids: list[int], num_samples: int, want_logprobs: bool,
                 contract: Optional[LogprobContract] = None, want_masks: bool = False) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.contract = contract
        self.tokens: list[list[int]] = [[] for _ in range(num_samples)]
        self.logprobs: Optional[list[list[LogprobRow]]] = [[] for _ in range(num_samples)] if want_logprobs else None
        self.masks: Optional[list[list[list[int]]]] = [[] for _ in range(num_samples)] if want_masks else None
        self.texts: list[list[str]] = [[] for _ in range(num_samples)]
        self.versions: list[list[int]] = [[] for _ in range(num_samples)]
        self.finish: list[Optional[str]] = [None] * num_samples
        self.prompt_logprobs: Optional[list[Optional[LogprobRow]]] = None

    def add(self, output: EngineOutput) -> None:
        i = output.index
        self.tokens[i].extend(output.token_ids)
        self.versions[i].extend([output.weight_version] * len(output.token_ids))
        if self.logprobs is not None and output.logprobs:
            self.logprobs[i].extend(output.logprobs)
        if self.masks is not None and output.sampling_masks:
            self.masks[i].extend(output.sampling_masks)
        if output.text:
            self.texts[i].append(output.text)
        if output.finish_reason is not None:
            self.finish[i] = output.finish_reason
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs

    def build(self, continuation: Continuation) -> SampleResponse:
        return self._response([self._sequence(i, continuation) for i in range(len(self.tokens))])

    def scored(self, num_samples: int, feature: Mapping[str, Any]) -> SampleResponse:
        """The response of a scoring request (``max_tokens=0``): the prompt logprobs and ``num_samples`` empty
        sequences whose ``new_input_feature`` is a plain copy of the prompt's feature."""
        return self._response([SampledSequence.model_construct(
            stop_reason='length', tokens=[], logprobs=None, decoded='', new_input_feature=plain_copy(feature),
            weight_versions=[]) for _ in range(num_samples)])

    def _response(self, sequences: list[SampledSequence]) -> SampleResponse:
        prompt_lps = topk = None
        if self.prompt_logprobs is not None:
            prompt_lps = [None if row is None else row[0][1] for row in self.prompt_logprobs]
            topk = [None if row is None else row[1:] for row in self.prompt_logprobs]
        return SampleResponse.model_construct(sequences=sequences, prompt_token_ids=self.prompt_token_ids,
                                              prompt_logprobs=prompt_lps, topk_prompt_logprobs=topk)

    def _sequence(self, i: int, continuation: Continuation) -> SampledSequence:
        tokens = self.tokens[i]
        contract = {} if self.contract is None else dataclasses.asdict(self.contract)
        return SampledSequence.model_construct(
            stop_reason=self.finish[i] or 'abort', tokens=tokens,
            logprobs=None if self.logprobs is None else self.logprobs[i], decoded=''.join(self.texts[i]),
            new_input_feature=continuation(tokens), weight_versions=self.versions[i],
            sampling_mask=None if self.masks is None else self.masks[i], **contract)


def empty_response() -> SampleResponse:
    """The response of a prompt the template's ``truncation_strategy='delete'`` dropped: no sequences."""
    return SampleResponse.model_construct(sequences=[], prompt_token_ids=None, prompt_logprobs=None,
                                          topk_prompt_logprobs=None)
