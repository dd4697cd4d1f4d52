"""Pure request building: inputs -> prompt token ids, SamplingParams -> RequestParams (validated)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from twinkle_async.data_format.sampling_params import SamplingParams
from twinkle_async.engines.base import RequestParams
from twinkle_async.errors import InvalidInputError, InvalidSamplingParamsError, PromptTooLongError
from twinkle_async.template import Template

__all__ = ['coerce_params', 'as_items', 'prompt_token_ids', 'resolve_params']

ParamsLike = Union[SamplingParams, Mapping[str, Any], None]


def coerce_params(params: ParamsLike, num_samples: Optional[int] = None) -> SamplingParams:
    """A ``SamplingParams`` from an instance, a dict or ``None``; ``num_samples`` overrides its field.

    Raises:
        InvalidSamplingParamsError: unknown keys or invalid values (named).
    """
    if params is None:
        params = SamplingParams()
    elif isinstance(params, Mapping):
        params = SamplingParams.from_dict(params)
    elif not isinstance(params, SamplingParams):
        raise InvalidSamplingParamsError(
            f'sampling_params must be SamplingParams, a dict or None, got {type(params).__name__}')
    if num_samples is not None:
        params = SamplingParams(**{**params.model_dump(), 'num_samples': num_samples})
    return params


def as_items(inputs: Any) -> tuple[list[Any], bool]:
    """The inputs of a ``sample`` call as a list, and whether it was one input (a dict) rather than a list.

    Raises:
        InvalidInputError: neither a dict nor a list/tuple of inputs.
    """
    if isinstance(inputs, Mapping):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        return list(inputs), False
    raise InvalidInputError('inputs must be an InputFeature or a Trajectory dict, or a list of them, '
                            f'got {type(inputs).__name__}')


def prompt_token_ids(item: Any, template: Template, vocab_size: int) -> list[int]:
    """Token ids for one input: an ``InputFeature`` (has ``input_ids``) or a ``Trajectory``.

    Raises:
        InvalidInputError: empty or malformed ids, ids outside the vocabulary, malformed trajectory.
    """
    if not isinstance(item, Mapping):
        raise InvalidInputError(f'an input must be an InputFeature or a Trajectory dict, got {type(item).__name__}')
    if 'input_ids' in item:
        ids = _as_id_list(item['input_ids'])
    else:
        ids = list(template.encode(dict(item))['input_ids'])
    if not ids:
        raise InvalidInputError('input_ids is empty: a prompt needs at least one token')
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidInputError(f'input_ids has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}')
    return ids


def resolve_params(params: SamplingParams, prompt_len: int, max_model_len: int,
                   vocab_size: int) -> RequestParams:
    """Engine-ready parameters for a prompt of ``prompt_len`` tokens.

    Raises:
        PromptTooLongError: no room for one generated token within ``max_model_len``.
        InvalidSamplingParamsError: stop token ids outside the vocabulary.
    """
    if prompt_len >= max_model_len:
        raise PromptTooLongError(f'prompt has {prompt_len} tokens; max_model_len={max_model_len} leaves no room '
                                 'to generate (shorten the prompt or raise max_model_len)')
    bad_stops = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad_stops:
        raise InvalidSamplingParamsError(f'stop: token ids outside the vocabulary [0, {vocab_size}): {bad_stops}')
    room = max_model_len - prompt_len
    return RequestParams(
        max_tokens=min(params.max_tokens or room, room), temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, repetition_penalty=params.repetition_penalty, seed=params.seed,
        stop_strings=params.stop_strings, stop_token_ids=params.stop_token_ids,
        include_stop_str_in_output=params.include_stop_str_in_output, ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs, num_samples=params.num_samples)


def _as_id_list(value: Any) -> list[int]:
    if hasattr(value, 'tolist'):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f'input_ids must be a list of ints, got {type(value).__name__}')
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidInputError('input_ids must contain only ints')
    return list(value)
