"""Engine contract: pause('abort' | 'keep' | 'wait') and resume; requests arriving while paused wait."""

from __future__ import annotations

import asyncio

import pytest

from twinkle_async.errors import InvalidRequestError

from conftest import within

LONG = {'max_tokens': 300, 'temperature': 0, 'ignore_eos': True}
SHORT = {'max_tokens': 8, 'temperature': 0, 'ignore_eos': True}


@pytest.fixture
async def pausable(sampler):
    """The shared sampler, resumed whatever the test did."""
    yield sampler
    await within(sampler.resume())


async def started(sampler, params: dict, prompt: list[int]) -> tuple[asyncio.Task, list]:
    """A task streaming ``prompt``; returns once its first token arrived, with the list its deltas go to."""
    first, deltas = asyncio.Event(), []

    async def consume() -> None:
        async for delta in sampler.stream({'input_ids': prompt}, params):
            deltas.append(delta)
            first.set()

    task = asyncio.create_task(consume())
    await within(first.wait())
    return task, deltas


async def still_waiting(task: asyncio.Task) -> bool:
    done, _ = await asyncio.wait({task}, timeout=1.0)
    return not done


async def running(sampler, count: int) -> None:
    while (await sampler.engine.stats()).running < count:
        await asyncio.sleep(0.01)


async def test_abort_ends_requests_in_flight_with_their_partial_tokens(pausable):
    one_shot = asyncio.create_task(pausable.sample({'input_ids': [8, 9]}, LONG))
    task, deltas = await started(pausable, LONG, [5, 6, 7])
    await within(running(pausable, 2))
    await within(pausable.pause('abort'))
    await within(task)
    response = await within(one_shot)
    assert deltas[-1].finish_reason == 'abort' and 0 < sum(len(d.token_ids) for d in deltas) < 300
    assert response.sequences[0].stop_reason == 'abort' and len(response.sequences[0].tokens) < 300
    stats = await within(pausable.engine.stats())
    assert (stats.running, stats.used_slots) == (0, 0)


async def test_requests_arriving_while_paused_wait_for_resume(pausable):
    await within(pausable.pause('abort'))
    late = asyncio.create_task(pausable.sample({'input_ids': [5, 6, 7]}, SHORT))
    assert await still_waiting(late)
    await within(pausable.resume())
    assert len((await within(late)).sequences[0].tokens) == 8


async def test_wait_returns_once_requests_in_flight_have_finished(pausable):
    first, _ = await started(pausable, {**SHORT, 'max_tokens': 200}, [5, 6, 7])
    second = asyncio.create_task(pausable.sample({'input_ids': [9, 10]}, {**SHORT, 'max_tokens': 150}))
    await within(running(pausable, 2))
    await within(pausable.pause('wait'))
    assert first.done() and second.done()
    assert second.result().sequences[0].stop_reason == 'length'
    late = asyncio.create_task(pausable.sample({'input_ids': [5]}, SHORT))
    assert await still_waiting(late)
    await within(pausable.resume())
    await within(late)


async def test_keep_then_resume_without_an_update_changes_nothing(pausable):
    expected = (await within(pausable.sample({'input_ids': [11, 12, 13]}, {**LONG, 'max_tokens': 40}))).sequences[0]
    task, deltas = await started(pausable, {**LONG, 'max_tokens': 40}, [11, 12, 13])
    await within(pausable.pause('keep'))
    assert await still_waiting(task)
    await within(pausable.resume())
    await within(task)
    assert [t for d in deltas for t in d.token_ids] == expected.tokens


async def test_an_unknown_mode_is_refused(pausable):
    with pytest.raises(InvalidRequestError, match='drain'):
        await pausable.pause('drain')
