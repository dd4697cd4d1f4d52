"""``SamplingParams``: Twinkle's fields, validated, with errors that name the field."""

from __future__ import annotations

from typing import Any, Mapping, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from twinkle_async.errors import InvalidSamplingParamsError

__all__ = ['SamplingParams']

StopSpec = Union[str, list[str], list[int], None]


class SamplingParams(BaseModel):
    """How to sample. Field names and defaults follow ModelScope Twinkle.

    Args:
        max_tokens: most tokens to generate; ``None`` fills the model's context. ``0`` scores the prompt
            without generating (Twinkle's teacher scoring): it needs ``prompt_logprobs``, and the response's
            sequences are empty.
        seed: makes sampling reproducible; sample ``i`` of ``num_samples`` uses ``seed + i``.
        stop: a stop string, a list of stop strings (matched on decoded text, possibly spanning
            several tokens) or a list of stop token ids.
        include_stop_str_in_output: keep the matched stop string in the text.
        temperature: 0 means greedy.
        top_k: -1 disables it. top_p: in (0, 1]. repetition_penalty: > 0, 1 disables it.
        logprobs: ``None`` returns none; ``k >= 0`` returns the sampled token's logprob first,
            followed by the ``k`` most likely tokens (sorted), per generated token. The engine's
            ``max_logprobs`` (default 20) bounds ``k``; its ``logprobs_mode`` says which distribution.
        prompt_logprobs: like ``logprobs`` for the prompt tokens.
        num_samples: completions per input.
        ignore_eos: keep generating past the end-of-sequence token.

    Raises:
        InvalidSamplingParamsError: a value is out of range or a key is unknown.
    """

    model_config = ConfigDict(extra='forbid', frozen=True, strict=False)

    max_tokens: int | None = None
    seed: int | None = None
    stop: StopSpec = None
    include_stop_str_in_output: bool = False
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    num_samples: int = 1
    ignore_eos: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidSamplingParamsError(_describe(exc)) from None

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

    @field_validator('max_tokens')
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f'must be >= 0 (0 scores the prompt only), got {value}')
        return value

    @field_validator('temperature')
    @classmethod
    def _temperature(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError(f'must be >= 0 (0 is greedy), got {value}')
        return value

    @field_validator('top_k')
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f'must be -1 (off) or >= 1, got {value}')
        return value

    @field_validator('top_p')
    @classmethod
    def _top_p(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f'must be in (0, 1], got {value}')
        return value

    @field_validator('repetition_penalty')
    @classmethod
    def _repetition_penalty(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f'must be > 0, got {value}')
        return value

    @field_validator('logprobs', 'prompt_logprobs')
    @classmethod
    def _logprobs(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f'must be None or >= 0, got {value}')
        return value

    @field_validator('num_samples')
    @classmethod
    def _num_samples(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f'must be >= 1, got {value}')
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

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings, matched on decoded text."""
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(s for s in self.stop or () if isinstance(s, str))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The stop token ids."""
        return tuple(s for s in self.stop or () if isinstance(s, int) and not isinstance(s, bool))


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = '.'.join(str(loc) for loc in error['loc']) or 'SamplingParams'
        message = error['msg'].removeprefix('Value error, ')
        if error['type'] == 'extra_forbidden':
            message = 'unknown sampling parameter'
        if 'got' not in message:
            message += f' (got {error.get("input")!r})'
        parts.append(f'{field}: {message}')
    return 'invalid SamplingParams: ' + '; '.join(parts)
