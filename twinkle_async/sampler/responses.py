"""Pure response building: engine outputs -> ``SampledSequence`` / ``SampleResponse`` / ``TokenDelta``."""

from __future__ import annotations

from typing import Optional

from twinkle_async.data_format.inputs import InputFeature
from twinkle_async.data_format.outputs import LogprobRow, SampledSequence, SampleResponse, TokenDelta
from twinkle_async.engines.base import EngineOutput

__all__ = ['ResponseBuilder', 'to_delta']


def to_delta(output: EngineOutput) -> TokenDelta:
    return TokenDelta(output.index, output.token_ids, output.logprobs, output.text, output.finish_reason,
                      output.weight_version)


class ResponseBuilder:
    """Accumulates one request's outputs (any sample order) into a ``SampleResponse``."""

    def __init__(self, prompt_token_ids: list[int], num_samples: int, want_logprobs: bool) -> None:
        self.prompt_token_ids = prompt_token_ids
        self.tokens: list[list[int]] = [[] for _ in range(num_samples)]
        self.logprobs: Optional[list[list[LogprobRow]]] = [[] for _ in range(num_samples)] if want_logprobs else None
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
        if output.text:
            self.texts[i].append(output.text)
        if output.finish_reason is not None:
            self.finish[i] = output.finish_reason
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs

    def build(self) -> SampleResponse:
        sequences = [self._sequence(i) for i in range(len(self.tokens))]
        prompt_lps = topk = None
        if self.prompt_logprobs is not None:
            prompt_lps = [None if row is None else row[0][1] for row in self.prompt_logprobs]
            topk = [None if row is None else row[1:] for row in self.prompt_logprobs]
        return SampleResponse.model_construct(sequences=sequences, prompt_token_ids=self.prompt_token_ids,
                                              prompt_logprobs=prompt_lps, topk_prompt_logprobs=topk)

    def _sequence(self, i: int) -> SampledSequence:
        tokens = self.tokens[i]
        feature = InputFeature(input_ids=self.prompt_token_ids + tokens)
        return SampledSequence.model_construct(
            stop_reason=self.finish[i] or 'abort', tokens=tokens,
            logprobs=None if self.logprobs is None else self.logprobs[i], decoded=''.join(self.texts[i]),
            new_input_feature=feature, weight_versions=self.versions[i])
