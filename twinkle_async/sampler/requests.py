"""Pure request building: inputs -> prompt features and token ids, SamplingParams -> RequestParams (validated)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from twinkle_async.data_format.sampling_params import SamplingParams
from twinkle_async.engines.base import RequestParams
from twinkle_async.errors import InvalidInputError, InvalidSamplingParamsError, PromptTooLongError
from twinkle_async.template import Template
from twinkle_async.template.features import as_id_list, unrolled_labels

__all__ = ['coerce_params', 'as_items', 'encode_input', 'resolve_params']

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


def encode_input(item: Any, template: Template, vocab_size: int,
                 scoring: bool = False) -> tuple[Optional[Mapping[str, Any]], list[int]]:
    """The prompt feature and its token ids for one input: an ``InputFeature`` (has ``input_ids``; its other keys
    are carried) or a ``Trajectory``, encoded by ``template`` (with the generation prompt unless ``scoring``).
    The feature is ``None`` (and the ids empty) when the template's ``truncation_strategy='delete'`` dropped it.

    Raises:
        InvalidInputError: empty or malformed ids, ids outside the vocabulary, labels that do not match the ids,
            a malformed trajectory, or a prompt over the template's ``max_length`` (``'raise'``).
    """
    if not isinstance(item, Mapping):
        raise InvalidInputError(f'an input must be an InputFeature or a Trajectory dict, got {type(item).__name__}')
    feature = item if 'input_ids' in item else template.encode(item, add_generation_prompt=not scoring)
    if feature is None:
        return None, []
    ids = as_id_list(feature['input_ids'])
    if not ids:
        raise InvalidInputError('input_ids is empty: a prompt needs at least one token')
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidInputError(f'input_ids has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}')
    unrolled_labels(feature, len(ids))
    return feature, ids


def resolve_params(params: SamplingParams, prompt_len: int, max_model_len: int, vocab_size: int,
                   max_logprobs: int = 20) -> RequestParams:
    """Engine-ready parameters for a prompt of ``prompt_len`` tokens (for scoring, ``max_tokens=0``: one
    greedy token, dropped from the response).

    Raises:
        PromptTooLongError: no room for one generated token within ``max_model_len``.
        InvalidSamplingParamsError: stop token ids outside the vocabulary, or more logprobs than the engine's
            ``max_logprobs``.
    """
    if prompt_len >= max_model_len:
        raise PromptTooLongError(f'prompt has {prompt_len} tokens; max_model_len={max_model_len} leaves no room '
                                 'to generate (shorten the prompt or raise max_model_len)')
    for field in ('logprobs', 'prompt_logprobs'):
        k = getattr(params, field)
        if k is not None and k > max_logprobs:
            raise InvalidSamplingParamsError(f'{field}={k} is over the engine\'s max_logprobs={max_logprobs} '
                                             "(raise it with engine_args={'max_logprobs': ...})")
    bad_stops = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad_stops:
        raise InvalidSamplingParamsError(f'stop: token ids outside the vocabulary [0, {vocab_size}): {bad_stops}')
    if params.scoring:  # one throw-away greedy token: engines compute prompt logprobs as part of a generation
        return RequestParams(max_tokens=1, temperature=0.0, prompt_logprobs=params.prompt_logprobs)
    room = max_model_len - prompt_len
    return RequestParams(**{**params.model_dump(), 'max_tokens': min(params.max_tokens or room, room)})
