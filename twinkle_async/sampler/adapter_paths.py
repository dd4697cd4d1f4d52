"""Adapters named by their directory (Twinkle's ``sample(..., adapter_path=...)``): loaded once, reloaded when
the directory's files change."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Awaitable, Callable

from twinkle_async.errors import InvalidAdapterError

__all__ = ['AdapterPaths']

Stamp = tuple[tuple[str, int, int], ...]


class AdapterPaths:
    """Which adapter directory is loaded under which name, and as of which version of its files."""

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[Path, Stamp]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, path: str | os.PathLike[str], name: str, loaded: Callable[[], list[str]],
                     add: Callable[[str, str], Awaitable[None]]) -> str:
        """The adapter name serving ``path``: ``name``, or one derived from the path when ``name`` is ''.
        ``add(name, directory)`` (re)loads it when it is not loaded yet, its files changed, or it was removed.

        Raises:
            InvalidAdapterError: ``path`` is not a directory.
        """
        directory = Path(path).expanduser().resolve()
        if not directory.is_dir():
            raise InvalidAdapterError(f'adapter_path {str(path)!r} is not a directory (a PEFT adapter saved with '
                                      'save_pretrained)')
        name = name or 'path-' + hashlib.sha1(str(directory).encode()).hexdigest()[:16]
        async with self._locks.setdefault(name, asyncio.Lock()):
            stamp = await asyncio.to_thread(_stamp, directory)
            if self._loaded.get(name) != (directory, stamp) or name not in loaded():
                await add(name, str(directory))
                self._loaded[name] = (directory, stamp)
        return name


def _stamp(directory: Path) -> Stamp:
    """Name, size and modification time of every file: a change in any of them means new weights."""
    entries = ((p.name, p.stat()) for p in directory.iterdir() if p.is_file())
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in entries))
