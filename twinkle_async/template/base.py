"""``Template``: trajectories -> prompt features with the model's own chat template, and back.

Constructed as Twinkle's ``Template(model_id, use_chat_template=True, max_length=8192,
truncation_strategy='raise', default_system=None, enable_thinking=True, **template_vars)``; the first argument
may also be a tokenizer or a vision-language model's :class:`~twinkle_async.multimodal.ImageProcessor`. Every
keyword it does not know is a chat-template variable.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, cast

from twinkle_async.data_format.inputs import InputFeature
from twinkle_async.errors import InvalidImageError, InvalidInputError, PromptTooLongError
from twinkle_async.multimodal.images import load_image
from twinkle_async.multimodal.messages import gather_images
from twinkle_async.multimodal.processing import TEXT_ONLY, ImageProcessor, MultiModalPrompt, load_image_processor
from twinkle_async.template.detokenizer import IncrementalDetokenizer
from twinkle_async.template.features import (
    IGNORE,
    as_id_list,
    check_truncation_strategy,
    concat_ids,
    plain_copy,
    truncate_ids,
    with_ids,
)
from twinkle_async.template.messages import hf_messages, hf_tools
from twinkle_async.template.tool_parsers import detect_tool_parser

__all__ = ['Template', 'ChatMLTemplate', 'CHATML']

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Template:
    """Encodes trajectories with a chat template (the tokenizer's own unless the class or ``chat_template``
    sets one) and builds continuation features.

    With a vision-language model's processor, trajectories may hold images (see ``multimodal.messages`` for the
    forms): the processor expands them into the model's image tokens, and the feature carries ``images`` (RGB PIL, in
    prompt order) and the processor's pixel tensors (``pixel_values``, ...), so a trainer's forward sees the pixels
    the sampler saw.

    Args:
        model_id: a tokenizer, an ``ImageProcessor``, or a model id / directory to load them from (see
            ``resolve_model``).
        use_chat_template: ``False`` tokenizes a single user message's text as is.
        max_length: longest prompt, in tokens (``None``: no limit); see ``truncation_strategy``.
        truncation_strategy: for longer prompts, 'raise' (``PromptTooLongError``), 'left' (keep the last
            ``max_length`` tokens), 'right' (keep the first) or 'delete' (the prompt is dropped: its response has
            no sequences).
        default_system: a system message put first when a trajectory starts with a user message.
        enable_thinking: handed to the chat template (Qwen3's switch), as are all other keywords.
        chat_template: a Jinja chat template overriding the tokenizer's.

    Raises:
        ConfigurationError: an unknown truncation strategy.
    """

    chat_template: Optional[str] = None

    def __init__(self, model_id: Any, use_chat_template: bool = True, max_length: Optional[int] = 8192,
                 truncation_strategy: str = 'raise', default_system: Optional[str] = None,
                 enable_thinking: bool = True, *, chat_template: Optional[str] = None, **template_vars: Any) -> None:
        check_truncation_strategy(truncation_strategy)
        if isinstance(model_id, (str, os.PathLike)):
            model_id = _load_processor(model_id)
        self.images: Optional[ImageProcessor] = model_id if isinstance(model_id, ImageProcessor) else None
        self.tokenizer = self.images.tokenizer if self.images else model_id
        if chat_template is not None:
            self.chat_template = chat_template
        elif self.chat_template is None and self.images:
            self.chat_template = getattr(self.images.processor, 'chat_template', None)
        if self.chat_template is None and not getattr(self.tokenizer, 'chat_template', None):
            self.chat_template = CHATML
        self.use_chat_template = use_chat_template
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.default_system = default_system
        self.enable_thinking = enable_thinking
        self.template_vars = template_vars

    @property
    def processor(self) -> Any:
        """The model's processor (vision-language models), else the tokenizer: Twinkle's name."""
        return self.images.processor if self.images else self.tokenizer

    def encode(self, trajectory: Mapping[str, Any], add_generation_prompt: bool = True) -> Optional[InputFeature]:
        """The trajectory as a prompt feature: a copy of it (``messages``, ``tools`` and every other key, the
        default system message added) with ``input_ids``, ``labels`` (all ignored), ``attention_mask``,
        ``position_ids`` and ``length``. ``None`` when ``truncation_strategy='delete'`` drops it.

        Raises:
            InvalidInputError: no messages, unknown roles, malformed messages or tools, a template error.
            PromptTooLongError: longer than ``max_length`` with ``truncation_strategy='raise'``.
        """
        feature = plain_copy(trajectory)
        if self.default_system and self.use_chat_template:
            feature['messages'] = _with_system(feature.get('messages'), self.default_system)
        gathered = gather_images(feature)
        rendered = self._tokenize(feature, add_generation_prompt) if gathered is None else \
            self._tokenize_with_images(feature, *gathered, add_generation_prompt)
        ids = truncate_ids(rendered, self.max_length, self.truncation_strategy)
        if ids is None:
            return None
        return cast(InputFeature, with_ids(feature, ids, [IGNORE] * len(ids)))

    def multimodal_prompt(self, feature: Mapping[str, Any], ids: list[int]) -> Optional[MultiModalPrompt]:
        """The images of a prompt feature (its ``images``, with ``mm_processor_kwargs``) as an engine takes them;
        ``None`` without images.

        Raises:
            InvalidImageError: an unreadable image, or images for a text-only model.
            InvalidInputError: ``ids`` do not hold the images' tokens as the processor expands them, or hold image
                tokens without images.
        """
        images = feature.get('images')
        if not images:
            if self.images is not None and self.images.holds_placeholder(ids):
                raise InvalidInputError(f'the prompt holds image tokens ({self.images.placeholder}) but no images')
            return None
        loaded = tuple(load_image(image, f'images[{i}]') for i, image in enumerate(self._image_list(images)))
        kwargs = dict(feature.get('mm_processor_kwargs') or {})
        return MultiModalPrompt(loaded, self._checked_images().collapse(ids, loaded, kwargs), kwargs)

    def pixel_features(self, feature: Mapping[str, Any], prompt: MultiModalPrompt) -> dict[str, Any]:
        """``feature`` with the image processor's tensors for ``prompt`` under the keys it lacks (an ``InputFeature``
        given only ``images``), so its continuation carries them."""
        pixels = self._checked_images().pixels(prompt.images, prompt.processor_kwargs)
        missing = {key: value for key, value in pixels.items() if key not in feature}
        return {**feature, **missing} if missing else dict(feature)

    def batch_encode(self, trajectories: Sequence[Mapping[str, Any]],
                     add_generation_prompt: bool = True) -> list[InputFeature]:
        """``encode`` each; dropped ones (``truncation_strategy='delete'``) are left out."""
        features = (self.encode(t, add_generation_prompt) for t in trajectories)
        return [f for f in features if f is not None]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Token ids to text."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens, **kwargs)

    def detokenizer(self, prompt_token_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer."""
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids)

    def parse_tool_call(self, text: str) -> list[dict[str, Any]]:
        """OpenAI-shaped tool calls found in ``text`` by the first matching registered parser."""
        parser = detect_tool_parser(text)
        return parser.parse(text) if parser else []

    def clean_tool_call(self, text: str) -> str:
        """``text`` without tool-call markup."""
        parser = detect_tool_parser(text)
        return parser.clean(text) if parser else text

    def split_tool_calls(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """``(content, calls)``: ``text`` without tool-call markup and the calls in it, or ``(text, [])``."""
        parser = detect_tool_parser(text)
        calls = parser.parse(text) if parser else []
        return (parser.clean(text), calls) if parser and calls else (text, [])

    def concat_input_feature(self, prompt_feature: InputFeature, new_tokens: Sequence[int]) -> InputFeature:
        """Twinkle's continuation: a copy of ``prompt_feature`` (every key) with ``input_ids`` = prompt +
        completion, ``labels`` extended by the completion (rolled, as Twinkle stores them), ``attention_mask``,
        ``position_ids`` and ``length`` for the whole, and, when it has ``messages``, an appended assistant
        message holding the completion's text and the ``tool_calls`` parsed from it. ``prompt_feature`` is not
        modified.
        """
        result = concat_ids(prompt_feature, new_tokens)
        messages = result.get('messages')
        if isinstance(messages, list):
            messages.append(self._assistant_message(list(new_tokens), messages))
        return cast(InputFeature, result)

    def _assistant_message(self, tokens: list[int], history: list[Any]) -> dict[str, Any]:
        text = self.decode(tokens)
        content, calls = self.split_tool_calls(text)
        if not calls:
            return {'role': 'assistant', 'content': text}
        earlier = sum(len(m.get('tool_calls') or []) for m in history if isinstance(m, dict))
        for number, call in enumerate(calls, start=earlier):
            call['id'] = f'call_{number}'
        return {'role': 'assistant', 'content': content, 'tool_calls': calls}

    def _tokenize(self, feature: dict[str, Any], add_generation_prompt: bool) -> list[int]:
        if not self.use_chat_template:
            return self._tokenize_plain(feature)
        return list(self.tokenizer(self._render(feature, add_generation_prompt), add_special_tokens=False)['input_ids'])

    def _render(self, feature: dict[str, Any], add_generation_prompt: bool) -> str:
        messages, tools = hf_messages(feature), hf_tools(feature)
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, enable_thinking=self.enable_thinking,
                **self.template_vars)
        except Exception as exc:  # jinja raises its own error types for template-level problems
            raise InvalidInputError(f'chat template failed on this trajectory: {exc}') from exc

    def _tokenize_with_images(self, feature: dict[str, Any], messages: list[Any], images: list[Any],
                              add_generation_prompt: bool) -> list[int]:
        """The prompt with images expanded by the processor; ``feature`` gets the rewritten ``messages``, the loaded
        ``images`` and the pixel tensors."""
        if not self.use_chat_template:
            raise InvalidInputError('use_chat_template=False takes text only: images need the chat template')
        processor = self._checked_images()
        feature['messages'] = messages
        feature['images'] = [load_image(image, f'images[{i}]') for i, image in enumerate(images)]
        text = self._render(feature, add_generation_prompt)
        ids, pixels = processor.expand(text, feature['images'], feature.get('mm_processor_kwargs') or {})
        if self.max_length and len(ids) > self.max_length and self.truncation_strategy != 'delete':
            raise PromptTooLongError(f'the prompt has {len(ids)} tokens with its images, over max_length='
                                     f'{self.max_length}; a prompt with images is never cut (its image tokens would '
                                     "be): raise max_length or use truncation_strategy='delete'")
        feature.update(pixels)
        return ids

    def _checked_images(self) -> ImageProcessor:
        if self.images is None:
            raise InvalidImageError(TEXT_ONLY)
        return self.images

    @staticmethod
    def _image_list(images: Any) -> list[Any]:
        if not isinstance(images, (list, tuple)):
            raise InvalidImageError(f'images must be a list, got {type(images).__name__}')
        return list(images)

    def _tokenize_plain(self, feature: dict[str, Any]) -> list[int]:
        messages = hf_messages(feature)
        if len(messages) != 1 or messages[0]['role'] != 'user' or not isinstance(messages[0]['content'], str):
            raise InvalidInputError('use_chat_template=False takes one user message with text content, got '
                                    f'{[m["role"] for m in messages]}')
        return as_id_list(self.tokenizer.encode(messages[0]['content']))


class ChatMLTemplate(Template):
    """ChatML (``<|im_start|>role\\n...<|im_end|>``), whatever the tokenizer ships."""

    chat_template = CHATML


def _with_system(messages: Any, system: str) -> Any:
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and \
            messages[0].get('role') == 'user':
        return [{'role': 'system', 'content': system}, *messages]
    return messages


def _load_processor(model_id: Any) -> Any:
    """The model's ``ImageProcessor`` (vision-language models), else its tokenizer."""
    from transformers import AutoTokenizer

    from twinkle_async.models import resolve_model
    model_dir = resolve_model(str(model_id))
    return load_image_processor(model_dir) or AutoTokenizer.from_pretrained(model_dir)
