"""``SamplerActor``: one :class:`AsyncSampler` inside an async Ray actor (one replica of a remote sampler)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator, Mapping, Optional

from twinkle_async.adapters import BASE_MODEL
from twinkle_async.data_format.outputs import TokenDelta
from twinkle_async.engines.base import EngineStats
from twinkle_async.sampler.async_sampler import AsyncSampler

__all__ = ['SamplerActor']

_END = object()


class SamplerActor:
    """Runs on the actor's event loop; every method is a thin call into the sampler it hosts."""

    def __init__(self, model_id: str, engine: str, engine_args: Mapping[str, Any], template: Any) -> None:
        self.sampler = AsyncSampler(model_id, engine=engine, engine_args=engine_args, template=template)
        self.served = 0

    async def start(self) -> int:
        await self.sampler.start()
        return os.getpid()

    async def sample(self, inputs: Any, params: Any, adapter_name: str, return_exceptions: bool,
                     timeout: Optional[float]) -> Any:
        self.served += 1
        return await self.sampler.sample(inputs, params, adapter_name, return_exceptions=return_exceptions,
                                         timeout=timeout)

    async def stream(self, inputs: Any, params: Any, adapter_name: str, timeout: Optional[float],
                     coalesce_s: float) -> AsyncIterator[list[TokenDelta]]:
        """Deltas in lists: whatever arrived within ``coalesce_s`` of the first one travels as one Ray item."""
        self.served += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(self.sampler.stream(inputs, params, adapter_name, timeout=timeout),
                                              queue))
        try:
            while True:
                batch = [await queue.get()]
                if coalesce_s > 0:
                    await asyncio.sleep(coalesce_s)
                while not queue.empty():
                    batch.append(queue.get_nowait())
                done = batch[-1] is _END or isinstance(batch[-1], BaseException)
                deltas = [d for d in batch if isinstance(d, TokenDelta)]
                if deltas:
                    yield deltas
                if done:
                    if isinstance(batch[-1], BaseException):
                        raise batch[-1]
                    return
        finally:
            pump.cancel()  # a cancelled or dropped stream aborts its request in the engine

    async def add_adapter(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
        await self.sampler.add_adapter(name, config, tensors)

    async def remove_adapter(self, name: str) -> None:
        await self.sampler.remove_adapter(name)

    async def update_weights(self, weights: Mapping[str, Any], adapter_name: Optional[str], version: int) -> int:
        return await self.sampler.update_weights(weights, adapter_name=adapter_name, version=version)

    # the two phases of an update across replicas (the remote sampler orders them)
    async def stage_weights(self, weights: Mapping[str, Any], adapter_name: Optional[str]) -> None:
        await self.sampler.engine.stage_weights(weights, adapter_name or BASE_MODEL)

    async def commit_weights(self, version: int) -> None:
        await self.sampler.engine.commit_weights(version)

    async def discard_weights(self) -> None:
        await self.sampler.engine.discard_weights()

    async def pause(self, mode: str) -> None:
        await self.sampler.pause(mode)  # type: ignore[arg-type]

    async def resume(self) -> None:
        await self.sampler.resume()

    async def sleep(self, level: int) -> None:
        await self.sampler.sleep(level)

    async def wake_up(self, tags: Optional[list[str]]) -> None:
        await self.sampler.wake_up(tags)

    async def reset_cache(self, kind: Any) -> None:
        await self.sampler.reset_cache(kind)

    def set_template(self, template: Any, kwargs: Mapping[str, Any]) -> None:
        self.sampler.set_template(template, **kwargs)

    async def status(self) -> tuple[EngineStats, int, int, list[str]]:
        """The engine's counters, requests served, the weight version and the adapters loaded."""
        return await self.sampler.engine.stats(), self.served, self.sampler.weight_version, self.sampler.list_adapters()

    async def close(self) -> None:
        await self.sampler.close()

    @staticmethod
    async def _pump(stream: AsyncIterator[TokenDelta], queue: asyncio.Queue[Any]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait(delta)
            queue.put_nowait(_END)
        except Exception as exc:  # goes to the consumer, raised there
            queue.put_nowait(exc)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
