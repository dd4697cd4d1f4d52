"""A vision-language model's own processor, used three ways: expand a rendered prompt's image placeholders into the
model's image tokens (with the pixel tensors the model's forward takes), collapse those tokens back to one placeholder
per image (for engines that expand images themselves, such as vLLM), and compute the pixel tensors of images alone.

Nothing here knows a model family: the expansion of each image is whatever the processor makes of its placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from twinkle_async.errors import InvalidImageError, InvalidInputError

__all__ = ['MultiModalPrompt', 'ImageProcessor', 'load_image_processor', 'check_image_limit', 'PIXEL_KEYS_EXCLUDED',
           'TEXT_ONLY']

PIXEL_KEYS_EXCLUDED = ('input_ids', 'attention_mask', 'token_type_ids')
"""Keys of a processor's output that are about the text, not the images."""
TEXT_ONLY = 'this model is text-only (it has no image processor): it cannot take images'


@dataclass(frozen=True, slots=True)
class MultiModalPrompt:
    """A prompt's images as an engine takes them.

    ``images``: RGB PIL images in prompt order. ``placeholder_ids``: the prompt with one image placeholder per image,
    as the chat template writes it (an engine that expands images itself starts from these; ``EngineRequest.
    prompt_token_ids`` holds the expanded prompt it must arrive at). ``processor_kwargs``: ``mm_processor_kwargs``.
    """

    images: tuple[Any, ...]
    placeholder_ids: list[int]
    processor_kwargs: Mapping[str, Any] = field(default_factory=dict)


class ImageProcessor:
    """A model's processor (``AutoProcessor``: a tokenizer and an image processor) seen through what the sampler and
    the engines need of it."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder = processor.image_token
        self.placeholder_ids = self.tokenizer(self.placeholder, add_special_tokens=False)['input_ids']

    def expand(self, text: str, images: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[int], dict[str, Any]]:
        """The token ids of ``text`` with each image placeholder expanded, and the pixel tensors (every processor
        output but the text's).

        Raises:
            InvalidImageError: the processor refused the images (its reason named).
        """
        outputs = self._call(text=text, images=list(images) or None, kwargs=kwargs)
        ids = outputs.pop('input_ids')[0].tolist()
        return ids, {key: value for key, value in outputs.items() if key not in PIXEL_KEYS_EXCLUDED}

    def collapse(self, ids: Sequence[int], images: Sequence[Any], kwargs: Mapping[str, Any]) -> list[int]:
        """``ids`` (an expanded prompt) with each image's tokens replaced by one placeholder.

        Raises:
            InvalidInputError: the ids do not hold the images' tokens as the processor expands them, in order, or hold
                image placeholders without an image.
        """
        collapsed, at = [], 0
        for number, image in enumerate(images):
            tokens = self._call(text=self.placeholder, images=[image], kwargs=kwargs)['input_ids'][0].tolist()
            found = _find(ids, tokens, at)
            if found < 0:
                raise InvalidInputError(
                    f'input_ids do not hold image {number} as the processor expands it ({len(tokens)} tokens) after '
                    f'position {at}: the image changed, its tokens were expanded twice, or they are missing')
            collapsed += [*ids[at:found], *self.placeholder_ids]
            at = found + len(tokens)
        collapsed += ids[at:]
        placeholders = _count(collapsed, self.placeholder_ids)
        if placeholders != len(images):
            raise InvalidInputError(f'the prompt has {placeholders} image placeholders for {len(images)} images')
        return collapsed

    def holds_placeholder(self, ids: Sequence[int]) -> bool:
        """Whether ``ids`` hold an image placeholder (expanded or not)."""
        return _find(ids, self.placeholder_ids, 0) >= 0

    def pixels(self, images: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The image processor's tensors for ``images`` (what the model's forward takes with the expanded ids)."""
        try:
            return dict(self.processor.image_processor(list(images), return_tensors='pt', **kwargs))
        except (ValueError, TypeError) as exc:
            raise InvalidImageError(f'the image processor refused the images: {exc}') from exc

    def _call(self, text: str, images: Optional[list[Any]], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return dict(self.processor(text=text, images=images, add_special_tokens=False, return_tensors='pt',
                                       **kwargs))
        except (ValueError, TypeError) as exc:  # HF processors raise these for mismatched or bad images
            raise InvalidImageError(f'the model\'s processor refused the prompt\'s images: {exc}') from exc


def load_image_processor(model_dir: Path, trust_remote_code: bool = False) -> Optional[ImageProcessor]:
    """The model's processor when it takes images (its directory has a processor config with an image processor),
    else ``None`` (a text-only model)."""
    if not any((model_dir / name).exists() for name in ('preprocessor_config.json', 'processor_config.json')):
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if getattr(processor, 'image_processor', None) is None or getattr(processor, 'image_token', None) is None:
        return None
    return ImageProcessor(processor)


def check_image_limit(prompt: MultiModalPrompt, limit: Optional[int]) -> None:
    """An engine's check of a prompt's images against its ``limit_mm_per_prompt`` (0: a text-only model; ``None``:
    no limit).

    Raises:
        InvalidImageError: the model is text-only, or the prompt has more images than the limit.
    """
    if limit == 0:
        raise InvalidImageError(TEXT_ONLY)
    if limit is not None and len(prompt.images) > limit:
        raise InvalidImageError(f"the prompt has {len(prompt.images)} images, over this engine's "
                                f"limit_mm_per_prompt={{'image': {limit}}}")


def _find(ids: Sequence[int], tokens: Sequence[int], start: int) -> int:
    width = len(tokens)
    for at in range(start, len(ids) - width + 1):
        if ids[at] == tokens[0] and list(ids[at:at + width]) == list(tokens):
            return at
    return -1


def _count(ids: Sequence[int], tokens: Sequence[int]) -> int:
    count, at = 0, _find(ids, tokens, 0)
    while at >= 0:
        count += 1
        at = _find(ids, tokens, at + len(tokens))
    return count
