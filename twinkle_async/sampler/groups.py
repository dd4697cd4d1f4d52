"""``sample_groups``: sample groups until enough are accepted, then abort the rest (DAPO's dynamic sampling)."""

from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any, Awaitable, Callable, Iterator, Optional, Sequence, Union

from twinkle_async.data_format.outputs import SampleResponse
from twinkle_async.errors import InvalidRequestError

__all__ = ['Accept', 'sample_groups']

Accept = Callable[[SampleResponse], Union[bool, Awaitable[bool]]]


async def sample_groups(sampler: Any, prompts: Sequence[Any], params: Any, accept: Accept, target: int,
                        over_sample: float, adapter_name: str, timeout: Optional[float]) -> list[SampleResponse]:
    """See :meth:`AsyncSampler.sample_groups` (``params`` carries ``num_samples``)."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise InvalidRequestError(f'sample_groups: target must be an int >= 1, got {target!r}')
    if not over_sample >= 1:
        raise InvalidRequestError(f'sample_groups: over_sample must be >= 1, got {over_sample!r}')
    pending: Iterator[Any] = iter(prompts)
    running: set[asyncio.Task[SampleResponse]] = set()

    def submit() -> None:
        prompt = next(pending, None)
        if prompt is not None:
            running.add(asyncio.create_task(sampler.sample(prompt, params, adapter_name, timeout=timeout)))

    for _ in range(math.ceil(target * over_sample)):
        submit()
    accepted: list[SampleResponse] = []
    try:
        while running and len(accepted) < target:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                running.discard(task)
                response = task.result()
                verdict = accept(response)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                if verdict and len(accepted) < target:
                    accepted.append(response)
                elif not verdict:
                    sampler.rollouts.counts.rejected_groups += 1
                    submit()
    finally:
        for task in running:
            task.cancel()  # cancelling a sample call aborts its request in the engine
        await asyncio.gather(*running, return_exceptions=True)
        sampler.rollouts.counts.aborted_groups += len(running)
    return accepted
