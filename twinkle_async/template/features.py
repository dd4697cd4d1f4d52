"""Pure ``InputFeature`` arithmetic in Twinkle's layout: plain copies, prompt truncation, prompt + completion.

Twinkle stores ``labels`` rolled by one (``labels[i]`` is the target of position ``i``, the first label wraps to
the end) and gives every feature ``attention_mask``, ``position_ids`` and ``length``; these functions keep that
layout so a feature can go back and forth between the sampler and a Twinkle trainer unchanged.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence

from twinkle_async.errors import ConfigurationError, InvalidInputError, PromptTooLongError

__all__ = ['TRUNCATION_STRATEGIES', 'plain_copy', 'as_id_list', 'with_ids', 'unrolled_labels',
           'truncate_ids', 'concat_ids', 'check_truncation_strategy', 'IGNORE']

TRUNCATION_STRATEGIES: tuple[str, ...] = ('raise', 'left', 'right', 'delete')
IGNORE = -100


def plain_copy(value: Any) -> Any:
    """A deep copy in which arrays and tensors become lists and numpy scalars Python numbers (the input is
    left untouched). Pixel data is shared, not copied: PIL images, and arrays and tensors of three or more dimensions
    or of floating point with two (images, a processor's ``pixel_values``)."""
    if isinstance(value, Mapping):
        return {key: plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_copy(item) for item in value)
    if hasattr(value, 'tolist') and hasattr(value, 'shape'):  # numpy arrays and scalars, torch tensors
        return value if _is_pixels(value) else value.tolist()
    if isinstance(value, (str, int, float, bool, type(None))) or _is_pil_image(value):
        return value
    return copy.deepcopy(value)


def _is_pixels(array: Any) -> bool:
    """Images and pixel tensors: three or more dimensions, or two of floating point (a processor's flattened
    patches)."""
    dtype = array.dtype
    floating = getattr(dtype, 'is_floating_point', None)
    if floating is None:  # numpy
        floating = getattr(dtype, 'kind', '') == 'f'
    return len(array.shape) >= 3 or (bool(floating) and len(array.shape) >= 2)


def _is_pil_image(value: Any) -> bool:
    return type(value).__module__.startswith('PIL.')


def as_id_list(value: Any, field: str = 'input_ids') -> list[int]:
    """Token ids from a list, an array, a 1-D tensor or a batch of one.

    Raises:
        InvalidInputError: not a flat sequence of ints (``field`` is named).
    """
    if hasattr(value, 'tolist'):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f'{field} must be a list of ints, got {type(value).__name__}')
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidInputError(f'{field} must contain only ints')
    return list(value)


def with_ids(feature: dict[str, Any], input_ids: list[int], labels: list[int]) -> dict[str, Any]:
    """``feature`` holding ``input_ids`` and unrolled ``labels``, with Twinkle's derived fields set."""
    feature['input_ids'] = input_ids
    feature['labels'] = labels[1:] + labels[:1]
    feature['attention_mask'] = [1] * len(input_ids)
    feature['position_ids'] = list(range(len(input_ids)))
    feature['length'] = len(input_ids)
    return feature


def unrolled_labels(feature: Mapping[str, Any], prompt_len: int) -> list[int]:
    """The prompt's labels in input order (all ignored when the feature has none).

    Raises:
        InvalidInputError: ``labels`` and ``input_ids`` differ in length.
    """
    if feature.get('labels') is None:
        return [IGNORE] * prompt_len
    labels = as_id_list(feature['labels'], 'labels')
    if len(labels) != prompt_len:
        raise InvalidInputError(f'labels has {len(labels)} entries but input_ids has {prompt_len}')
    return labels[-1:] + labels[:-1]


def concat_ids(prompt_feature: Mapping[str, Any], new_tokens: Sequence[int]) -> dict[str, Any]:
    """A plain copy of ``prompt_feature`` continued by ``new_tokens``: ``input_ids`` = prompt + completion,
    ``labels`` = the prompt's labels + the completion (rolled), ``attention_mask`` / ``position_ids`` /
    ``length`` for the whole; every other key is carried over."""
    result = plain_copy(prompt_feature)
    prompt = as_id_list(result['input_ids'])
    return with_ids(result, prompt + list(new_tokens), unrolled_labels(result, len(prompt)) + list(new_tokens))


def check_truncation_strategy(strategy: str) -> None:
    """Raises ConfigurationError unless ``strategy`` is one a sampler can apply to a prompt."""
    if strategy not in TRUNCATION_STRATEGIES:
        hint = " ('split' would make several prompts of one)" if strategy == 'split' else ''
        raise ConfigurationError(f'truncation_strategy must be one of {TRUNCATION_STRATEGIES}, got {strategy!r}'
                                 + hint)


def truncate_ids(ids: list[int], max_length: Optional[int], strategy: str) -> Optional[list[int]]:
    """``ids`` fitted to ``max_length`` as Twinkle defines the strategies: 'left' keeps the last tokens,
    'right' the first, 'delete' drops the prompt (``None``), 'raise' refuses it.

    Raises:
        PromptTooLongError: ``strategy='raise'`` and the prompt is longer than ``max_length``.
    """
    if not max_length or len(ids) <= max_length:
        return ids
    if strategy == 'raise':
        raise PromptTooLongError(f'the prompt has {len(ids)} tokens, over the template\'s max_length={max_length} '
                                 "(truncation_strategy='raise'; 'left', 'right' or 'delete' fit it instead)")
    if strategy == 'left':
        return ids[-max_length:]
    if strategy == 'right':
        return ids[:max_length]
    return None
