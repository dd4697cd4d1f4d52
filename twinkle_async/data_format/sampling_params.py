"""``SamplingParams``: Twinkle's fields, validated, with errors that name the field."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twinkle_async.data_format.validation import describe_validation_error
from twinkle_async.errors import InvalidSamplingParamsError

__all__ = ['SamplingParams']

StopSpec = Union[str, list[str], list[int], None]


class SamplingParams(BaseModel):
    """How to sample. Field names and defaults follow ModelScope Twinkle; each field's ``description`` says what
    it does (the CLI's flags are built from them). The engine's ``max_logprobs`` (default 20) bounds
    ``logprobs``/``prompt_logprobs``; its ``logprobs_mode`` says which distribution they come from.

    Raises:
        InvalidSamplingParamsError: a value is out of range or a key is unknown.
    """

    model_config = ConfigDict(extra='forbid', frozen=True, strict=False)

    max_tokens: int | None = Field(
        default=None, ge=0, description='most tokens to generate; None fills the context; 0 scores the prompt '
        'without generating (needs prompt_logprobs; the sequences are empty)')
    seed: int | None = Field(default=None, description='makes sampling reproducible; sample i uses seed + i')
    stop: StopSpec = Field(default=None, description='a stop string, a list of them (matched on decoded text, '
                           'possibly across tokens) or a list of stop token ids')
    include_stop_str_in_output: bool = Field(default=False, description='keep the matched stop string in the text')
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False, description='0 is greedy')
    top_k: int = Field(default=-1, description='sample from the k most likely tokens; -1 disables it')
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False,
                         description='sample from the smallest set of tokens whose probability reaches p, in (0, 1]')
    repetition_penalty: float = Field(default=1.0, gt=0, allow_inf_nan=False,
                                      description='> 0; 1 disables it (as HF generate and vLLM apply it)')
    logprobs: int | None = Field(default=None, ge=0, description='per generated token: the sampled token\'s '
                                 'logprob first, then the k most likely (sorted); None returns none')
    prompt_logprobs: int | None = Field(default=None, ge=0, description='like logprobs, for the prompt tokens')
    num_samples: int = Field(default=1, ge=1, description='completions per input')
    ignore_eos: bool = Field(default=False, description='keep generating past the end-of-sequence token')
    return_sampling_mask: bool = Field(
        default=False, description='per generated token, the sorted ids the sampler could have drawn after '
        'top-k/top-p (SampledSequence.sampling_mask): what a trainer renormalises over to match the sampler')

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidSamplingParamsError(
                describe_validation_error(exc, 'SamplingParams', 'unknown sampling parameter')) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a dict; ``max_new_tokens`` is accepted for ``max_tokens``.

        Raises:
            InvalidSamplingParamsError: unknown keys (named) or invalid values.
        """
        data = dict(data)
        if 'max_new_tokens' in data:
            if 'max_tokens' in data:
                raise InvalidSamplingParamsError('give max_tokens or max_new_tokens, not both')
            data['max_tokens'] = data.pop('max_new_tokens')
        return cls(**data)

    @field_validator('top_k')
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f'must be -1 (off) or >= 1, got {value}')
        return value

    @field_validator('stop')
    @classmethod
    def _stop(cls, value: StopSpec) -> StopSpec:
        if isinstance(value, list):
            if any(isinstance(item, str) and not item for item in value):
                raise ValueError('stop strings must not be empty')
            if any(isinstance(item, int) and item < 0 for item in value):
                raise ValueError('stop token ids must be >= 0')
        elif value == '':
            raise ValueError('stop string must not be empty')
        return value

    @model_validator(mode='after')
    def _scoring_needs_prompt_logprobs(self) -> SamplingParams:
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError('max_tokens=0 generates nothing: it scores the prompt and needs prompt_logprobs '
                             '(e.g. prompt_logprobs=0 for the prompt tokens\' own logprobs, k for the top k too)')
        return self

    @property
    def scoring(self) -> bool:
        """``max_tokens=0``: score the prompt, generate nothing."""
        return self.max_tokens == 0

    @cached_property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings, matched on decoded text."""
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(s for s in self.stop or () if isinstance(s, str))

    @cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The stop token ids."""
        return tuple(s for s in self.stop or () if isinstance(s, int) and not isinstance(s, bool))
