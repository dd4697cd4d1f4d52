"""``WeightChannel``: the sampler's end of streamed weight updates (its store, and a task applying each update)."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from typing import Awaitable, Callable, Optional

from twinkle_async.errors import TwinkleAsyncError
from twinkle_async.transfer.protocol import UpdateHeader, connect, request_key, result_key, world_key
from twinkle_async.transfer.receiver import StreamedWeights

__all__ = ['WeightChannel']

Apply = Callable[[StreamedWeights, Optional[str], Optional[int]], Awaitable[int]]
"""``(weights, adapter_name, version) -> version``: the sampler's ``update_weights``."""

_POLL_S = 0.02  # seconds between two looks for the next update


class WeightChannel:
    """Hosts the store senders connect to and applies their updates one at a time, in order, with ``apply``."""

    def __init__(self, apply: Apply, host: str = '127.0.0.1', port: int = 0, timeout_s: float = 300.0) -> None:
        self.store = connect(f'{host}:{port}', timeout_s, is_master=True)
        self.address = f'{host}:{self.store.port}'
        self.timeout_s = timeout_s
        self._apply = apply
        self._task: asyncio.Task[None] = asyncio.create_task(self._listen())

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _listen(self) -> None:
        index = 1
        while True:
            header = await self._next_header(index)
            await self._serve(header)
            index += 1

    async def _next_header(self, index: int) -> UpdateHeader:
        key = request_key(index)
        while not self.store.check([key]):  # a local round trip to this process's own store
            await asyncio.sleep(_POLL_S)
        header: UpdateHeader = pickle.loads(self.store.get(key))
        return header

    async def _serve(self, header: UpdateHeader) -> None:
        weights = StreamedWeights(self.address, header, self.timeout_s)
        try:
            version = await self._apply(weights, header.adapter_name, header.version)
            result = f'ok:{version}'
        except TwinkleAsyncError as exc:
            result = f'error:{exc}'
        except Exception as exc:  # reported to the sender; the channel goes on
            result = f'error:{exc!r}'
        if not self.store.check([world_key(header.index)]):
            self.store.set(world_key(header.index), '0')  # refused before any receiver joined
        self.store.set(result_key(header.index), result)
