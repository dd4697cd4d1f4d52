"""Image inputs in every form Twinkle and OpenAI clients send, loaded as RGB PIL images.

Accepted: a PIL image; a local path (``str`` or ``os.PathLike``); a ``file://`` URL; an ``http(s)://`` URL (fetched
once, with a timeout); a base64 ``data:`` URL or bare base64 text; ``bytes``; Hugging Face datasets' ``{'bytes': ...}``
/ ``{'path': ...}``; an ``H x W`` or ``H x W x C`` uint8 array or tensor.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from twinkle_async.errors import InvalidImageError

__all__ = ['load_image', 'FETCH_TIMEOUT_S']

FETCH_TIMEOUT_S = 10.0
_BASE64 = re.compile(r'[A-Za-z0-9+/=\s]+')


def load_image(value: Any, where: str = 'image') -> Any:
    """``value`` as an RGB ``PIL.Image.Image``, fully decoded.

    Raises:
        InvalidImageError: an unsupported type, unreadable or corrupt bytes, a missing file or a URL that cannot be
            fetched (``where`` names the image).
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        return _decoded(value, where)
    if isinstance(value, (bytes, bytearray)):
        return _from_bytes(bytes(value), where)
    if isinstance(value, dict) and (value.get('bytes') or value.get('path')):
        return load_image(value.get('bytes') or value.get('path'), where)
    if isinstance(value, (str, os.PathLike)):
        return _from_reference(os.fspath(value), where)
    if hasattr(value, 'shape') and hasattr(value, 'tolist'):
        return _from_array(value, where)
    raise InvalidImageError(f'{where}: unsupported image type {type(value).__name__} (give a PIL image, a path, a '
                            'file://, http(s):// or data: URL, base64 text, bytes or a uint8 array)')


def _from_reference(text: str, where: str) -> Any:
    if text.startswith('data:'):
        header, _, payload = text.partition(',')
        if ';base64' not in header:
            raise InvalidImageError(f'{where}: a data: URL must be base64-encoded ("data:image/png;base64,...")')
        return _from_bytes(_b64decode(payload, where), where)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme == 'file':
        return _from_path(urllib.request.url2pathname(urllib.parse.urlparse(text).path), where)
    if scheme in ('http', 'https'):
        return _from_bytes(_fetch(text, where), where)
    if os.path.exists(text):
        return _from_path(text, where)
    if len(text) >= 16 and _BASE64.fullmatch(text):
        return _from_bytes(_b64decode(text, where), where)
    raise InvalidImageError(f'{where}: {text[:200]!r} is not an existing file, a URL or base64 image data')


def _from_path(path: str, where: str) -> Any:
    try:
        with open(path, 'rb') as file:
            return _from_bytes(file.read(), f'{where} ({path})')
    except OSError as exc:
        raise InvalidImageError(f'{where}: cannot read {path}: {exc}') from exc


def _fetch(url: str, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InvalidImageError(f'{where}: cannot fetch {url}: {exc}') from exc


def _b64decode(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f'{where}: invalid base64 image data: {exc}') from exc


def _from_bytes(data: bytes, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad bytes
        raise InvalidImageError(f'{where}: not a readable image ({len(data)} bytes): {exc}') from exc
    return _decoded(image, where)


def _from_array(array: Any, where: str) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(array.cpu() if hasattr(array, 'cpu') else array)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(f'{where}: an image array must be uint8 H x W or H x W x C (C 1, 3 or 4), got '
                                f'{pixels.dtype} {tuple(pixels.shape)}')
    return _decoded(Image.fromarray(pixels.squeeze(2) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels), where)


def _decoded(image: Any, where: str) -> Any:
    if image.width < 1 or image.height < 1:
        raise InvalidImageError(f'{where}: an empty image ({image.width} x {image.height})')
    return image if image.mode == 'RGB' else image.convert('RGB')
