"""``EngineActor``: one engine inside an async Ray actor (one replica of a :class:`ReplicaEngine`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Optional

from twinkle_async.adapters import AdapterSpec
from twinkle_async.engines.base import (
    CacheKind,
    Engine,
    EngineOutput,
    EngineRequest,
    EngineStats,
    LogprobsMode,
    PauseMode,
    apply_update,
)
from twinkle_async.engines.factory import create_engine
from twinkle_async.models import resolve_model
from twinkle_async.transfer.receiver import StreamedWeights
from twinkle_async.weights import NamedTensors

__all__ = ['EngineActor', 'EngineInfo']

_END = object()
_EARLY_ABORTS = 10_000  # aborts remembered for requests that have not reached this replica yet


@dataclass(frozen=True)
class EngineInfo:
    """What the driver needs to know of a replica's engine."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    logprobs_mode: LogprobsMode


class EngineActor:
    """Runs on the actor's event loop; every method is a thin call into the engine it hosts."""

    def __init__(self, model_id: str, kind: str, engine_args: Mapping[str, Any]) -> None:
        self.model_id, self.kind, self.engine_args = model_id, kind, dict(engine_args)
        self._engine: Optional[Engine] = None
        self.served = 0
        self._running: set[str] = set()
        self._early_aborts: OrderedDict[str, None] = OrderedDict()

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, 'the replica is not started'
        return self._engine

    async def start(self) -> EngineInfo:
        if self._engine is None:
            model_dir = await asyncio.to_thread(resolve_model, self.model_id)
            self._engine = await create_engine(self.kind, model_dir, self.engine_args)
        engine = self.engine
        return EngineInfo(engine.vocab_size, engine.max_model_len, engine.max_logprobs, engine.logprobs_mode)

    async def generate(self, request: EngineRequest, coalesce_s: float) -> AsyncIterator[list[EngineOutput]]:
        """The request's outputs in lists: whatever arrived within ``coalesce_s`` of the first one travels as one
        Ray item. Cancelling the generator (the driver left) aborts the request."""
        self.served += 1
        if request.request_id in self._early_aborts:
            del self._early_aborts[request.request_id]
            yield _aborted_outputs(request)
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._running.add(request.request_id)
        pump = asyncio.create_task(_pump(self.engine.generate(request), queue))
        try:
            while True:
                batch = [await queue.get()]
                if coalesce_s > 0:
                    await asyncio.sleep(coalesce_s)
                while not queue.empty():
                    batch.append(queue.get_nowait())
                outputs = [item for item in batch if isinstance(item, EngineOutput)]
                if outputs:
                    yield outputs
                if batch[-1] is _END:
                    return
                if isinstance(batch[-1], BaseException):
                    raise batch[-1]
        finally:
            self._running.discard(request.request_id)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def abort(self, request_id: str) -> None:
        """Abort a request here, or as soon as it arrives (the driver's abort may overtake its submission)."""
        if request_id in self._running:
            await self.engine.abort(request_id)
            return
        self._early_aborts[request_id] = None
        if len(self._early_aborts) > _EARLY_ABORTS:
            self._early_aborts.popitem(last=False)

    async def stats(self) -> EngineStats:
        return await self.engine.stats()

    async def status(self) -> tuple[EngineStats, int, int, list[str], int]:
        """The engine's counters, requests served, the weight version, the adapters loaded and this process's id."""
        engine = self.engine
        return await engine.stats(), self.served, engine.weight_version, list(engine.adapters), os.getpid()

    async def add_adapter(self, spec: AdapterSpec) -> None:
        await self.engine.add_adapter(spec)

    async def remove_adapter(self, name: str) -> None:
        await self.engine.remove_adapter(name)

    async def stage_weights(self, weights: NamedTensors, adapter_name: str, keep: bool = False) -> Optional[list[Any]]:
        """Stage an update; one streamed by a ``WeightSender`` is received here first (all of it, whatever the engine
        makes of it, so the sender's broadcast completes), and with ``keep`` put in the object store: ``[ref]``."""
        import ray

        if isinstance(weights, StreamedWeights):
            weights = dict(await asyncio.to_thread(weights.receive))
        kept = [ray.put(weights)] if keep else None
        await self.engine.stage_weights(weights, adapter_name)
        return kept

    async def commit_weights(self, version: int) -> None:
        await self.engine.commit_weights(version)

    async def discard_weights(self) -> None:
        await self.engine.discard_weights()

    async def apply_update(self, weights: NamedTensors, adapter_name: str, version: int) -> None:
        """Both phases at once: how a restarted replica replays a committed update."""
        await apply_update(self.engine, weights, adapter_name, version)

    async def pause(self, mode: PauseMode) -> None:
        await self.engine.pause(mode)

    async def resume(self) -> None:
        await self.engine.resume()

    async def sleep(self, level: int) -> None:
        await self.engine.sleep(level)

    async def wake_up(self) -> None:
        await self.engine.wake_up()

    async def reset_cache(self, kind: CacheKind) -> None:
        await self.engine.reset_cache(kind)

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.close()


def _aborted_outputs(request: EngineRequest) -> list[EngineOutput]:
    """What an engine streams for a request aborted before it ran: every sample ends with 'abort', no tokens."""
    logprobs: Optional[list[Any]] = [] if request.params.logprobs is not None else None
    return [EngineOutput(request.request_id, index, [], logprobs, '', 'abort')
            for index in range(request.params.num_samples)]


async def _pump(outputs: Any, queue: asyncio.Queue[Any]) -> None:
    try:
        async for output in outputs:
            queue.put_nowait(output)
        queue.put_nowait(_END)
    except Exception as exc:  # goes to the consumer, raised there
        queue.put_nowait(exc)
    finally:
        await outputs.aclose()
