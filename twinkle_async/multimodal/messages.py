"""Where a trajectory's images are: gathered in prompt order, with the messages rewritten to the content parts chat
templates read (``{'type': 'image'}``, ``{'type': 'text', 'text': ...}``).

The forms (Twinkle's and OpenAI's):

- content parts ``{'type': 'image', 'image' | 'url' | 'path': <image>}`` and ``{'type': 'image_url', 'image_url':
  {'url': <image>}}``; an image part without an image takes the next of the trajectory's ``images``;
- a message's own ``images=[...]`` fill the ``<image>`` placeholders of its text (images without a placeholder go
  first in the message);
- the trajectory's ``images=[...]`` fill image parts without an image, then ``<image>`` placeholders in text, in
  order; the rest go first in the first user message.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Optional

from twinkle_async.errors import InvalidImageError, InvalidInputError

__all__ = ['IMAGE_PLACEHOLDER', 'gather_images']

IMAGE_PLACEHOLDER = '<image>'
_IMAGE_KEYS = ('image', 'url', 'path')
_UNSUPPORTED_PARTS = ('video', 'video_url', 'audio', 'input_audio', 'audio_url')


def gather_images(trajectory: Mapping[str, Any]) -> Optional[tuple[list[Any], list[Any]]]:
    """``(messages, images)``: new messages whose images are ``{'type': 'image'}`` parts, and the images (as given,
    not loaded) in the order of those parts; ``None`` when the trajectory has no image.

    Raises:
        InvalidInputError: an image part that cannot be filled, more ``<image>`` placeholders than images, a video or
            audio part, or ``videos`` (named).
    """
    if trajectory.get('videos'):
        raise InvalidInputError('videos are not supported yet: send video frames as images')
    messages = trajectory.get('messages')
    pool = deque(_as_list(trajectory.get('images'), 'images'))
    if not isinstance(messages, list) or not (pool or any(_has_image(m) for m in messages)):
        return None
    images: list[Any] = []
    rewritten = [_message(m, f'messages[{i}]', pool, images) for i, m in enumerate(messages)]
    if pool:
        _prepend_to_first_user(rewritten, list(pool), images)
    return rewritten, images


def _message(message: Any, where: str, pool: deque[Any], images: list[Any]) -> Any:
    if not isinstance(message, Mapping):
        return message  # hf_messages names it
    content, own = message.get('content'), _as_list(message.get('images'), f'{where}.images')
    rewritten = {key: value for key, value in message.items() if key != 'images'}
    if isinstance(content, str):
        rewritten['content'] = _split_placeholders(content, deque(own) if own else pool, where, images, len(own))
    elif isinstance(content, list):
        start = len(images)
        parts = [_part(part, f'{where}.content[{j}]', pool, images) for j, part in enumerate(content)]
        images[start:start] = own  # a message's own images go first in it
        rewritten['content'] = [{'type': 'image'} for _ in own] + parts
    elif own:
        images.extend(own)
        rewritten['content'] = [{'type': 'image'} for _ in own]
    return rewritten


def _split_placeholders(text: str, source: deque[Any], where: str, images: list[Any], own: int) -> Any:
    """``text`` as content parts, each ``<image>`` taking the next image of ``source``; a message's own images
    without a placeholder go first."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    wanted = len(pieces) - 1
    if own and wanted > own:
        raise InvalidInputError(f'{where} has {wanted} {IMAGE_PLACEHOLDER} placeholders but {own} images')
    if not own and (not wanted or not source):
        return text
    if not own and wanted > len(source):
        raise InvalidInputError(f'{where} has {wanted} {IMAGE_PLACEHOLDER} placeholders but only {len(source)} '
                                "images are left in the trajectory's images")
    parts: list[dict[str, Any]] = []
    for _ in range(own - wanted):  # own images without a placeholder
        images.append(source.popleft())
        parts.append({'type': 'image'})
    for k, piece in enumerate(pieces):
        if k:
            images.append(source.popleft())
            parts.append({'type': 'image'})
        if piece:
            parts.append({'type': 'text', 'text': piece})
    return parts


def _part(part: Any, where: str, pool: deque[Any], images: list[Any]) -> Any:
    if not isinstance(part, Mapping):
        raise InvalidInputError(f'{where} must be a dict content part, got {type(part).__name__}')
    kind = part.get('type')
    if kind in _UNSUPPORTED_PARTS:
        raise InvalidInputError(f'{where}: {kind!r} content is not supported yet (images only)')
    if kind == 'image_url':
        url = part.get('image_url')
        url = url.get('url') if isinstance(url, Mapping) else url
        if not url:
            raise InvalidImageError(f'{where}: an image_url part needs {{"image_url": {{"url": ...}}}}')
        images.append(url)
        return {'type': 'image'}
    if kind != 'image':
        return dict(part)
    given = next((part[key] for key in _IMAGE_KEYS if part.get(key) is not None), None)
    if given is None:
        if not pool:
            raise InvalidImageError(f"{where}: an image part without an image, and the trajectory's images are used up")
        given = pool.popleft()
    images.append(given)
    return {'type': 'image'}


def _prepend_to_first_user(messages: list[Any], extra: list[Any], images: list[Any]) -> None:
    for at, message in enumerate(messages):
        if isinstance(message, Mapping) and message.get('role') == 'user':
            content = message.get('content')
            parts = [{'type': 'text', 'text': content}] if isinstance(content, str) and content else \
                list(content) if isinstance(content, list) else []
            messages[at] = {**message, 'content': [{'type': 'image'} for _ in extra] + parts}
            before = sum(_image_parts(m) for m in messages[:at])
            images[before:before] = extra
            return
    raise InvalidInputError("the trajectory's images have no user message to go in")


def _image_parts(message: Any) -> int:
    content = message.get('content') if isinstance(message, Mapping) else None
    return sum(1 for p in content if isinstance(p, Mapping) and p.get('type') == 'image') \
        if isinstance(content, list) else 0


def _has_image(message: Any) -> bool:
    if not isinstance(message, Mapping):
        return False
    content = message.get('content')
    return bool(message.get('images')) or isinstance(content, list) and any(
        isinstance(p, Mapping) and p.get('type') in ('image', 'image_url') for p in content)


def _as_list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InvalidInputError(f'{where} must be a list of images, got {type(value).__name__}')
