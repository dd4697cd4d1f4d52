"""Engine contract: pause('abort' | 'keep' | 'wait') and resume; requests arriving while paused are held
(the engine's own counters show them waiting, not running)."""

from __future__ import annotations

import asyncio

import pytest

from twinkle_async.errors import InvalidRequestError

from conftest import counters_when, start_stream, within

LONG = {'max_tokens': 300, 'temperature': 0, 'ignore_eos': True}
SHORT = {'max_tokens': 8, 'temperature': 0, 'ignore_eos': True}


@pytest.fixture
async def pausable(sampler):
    """The shared sampler, resumed whatever the test did."""
    yield sampler
    await within(sampler.resume())


async def held(sampler, inputs: dict, frozen: int = 0) -> asyncio.Task:
    """A sample call made while paused, once the engine counts it as held: waiting, with only the ``frozen``
    requests kept by pause('keep') running."""
    task = asyncio.create_task(sampler.sample(inputs, SHORT))
    await within(counters_when(sampler, lambda s: s.waiting == 1))
    stats = await within(sampler.engine.stats())  # one more round trip: the torch engine loops once between
    assert (stats.waiting, stats.running, stats.used_slots) == (1, frozen, frozen), 'held, not queued or run'
    assert not task.done()
    return task


async def test_abort_ends_requests_in_flight_with_their_partial_tokens(pausable):
    aborted_before = (await within(pausable.engine.stats())).aborted
    one_shot = asyncio.create_task(pausable.sample({'input_ids': [8, 9]}, LONG))
    task, deltas = await start_stream(pausable, {'input_ids': [5, 6, 7]}, LONG)
    await within(counters_when(pausable, lambda s: s.running == 2))
    await within(pausable.pause('abort'))
    await within(task)
    response = await within(one_shot)
    assert deltas[-1].finish_reason == 'abort' and 0 < sum(len(d.token_ids) for d in deltas) < 300
    assert response.sequences[0].stop_reason == 'abort' and len(response.sequences[0].tokens) < 300
    stats = await within(pausable.engine.stats())
    assert (stats.running, stats.used_slots, stats.aborted - aborted_before) == (0, 0, 2)


async def test_requests_arriving_while_paused_wait_for_resume(pausable):
    await within(pausable.pause('abort'))
    late = await held(pausable, {'input_ids': [5, 6, 7]})
    await within(pausable.resume())
    assert len((await within(late)).sequences[0].tokens) == 8


async def test_wait_returns_once_requests_in_flight_have_finished(pausable):
    first, _ = await start_stream(pausable, {'input_ids': [5, 6, 7]}, {**SHORT, 'max_tokens': 200})
    second = asyncio.create_task(pausable.sample({'input_ids': [9, 10]}, {**SHORT, 'max_tokens': 150}))
    await within(counters_when(pausable, lambda s: s.running == 2))
    await within(pausable.pause('wait'))
    await within(asyncio.gather(first, second))  # both end while paused: 'wait' let them finish ('keep' would not)
    assert second.result().sequences[0].stop_reason == 'length' and len(second.result().sequences[0].tokens) == 150
    assert (await within(pausable.engine.stats())).running == 0
    late = await held(pausable, {'input_ids': [5]})
    await within(pausable.resume())
    assert len((await within(late)).sequences[0].tokens) == 8


async def test_wait_also_drains_requests_queued_behind_a_full_batch(pausable):
    """Two more requests than the engine has sequence slots: the last ones are queued, not yet scheduled, when
    pause('wait') comes; they are in flight too, so they finish before it returns (vLLM's own 'wait' would hold
    them until resume)."""
    slots = pausable.engine_args['max_num_seqs']
    tasks = [asyncio.create_task(pausable.sample({'input_ids': [5, i]}, {**SHORT, 'max_tokens': 24}))
             for i in range(slots + 2)]
    await within(counters_when(pausable, lambda s: s.running + s.waiting == slots + 2))
    await within(pausable.pause('wait'))
    assert all(task.done() for task in tasks), 'every request in flight finished before wait returned'
    assert [len(t.result().sequences[0].tokens) for t in tasks] == [24] * (slots + 2)


async def test_keep_then_resume_without_an_update_changes_nothing(pausable):
    expected = (await within(pausable.sample({'input_ids': [11, 12, 13]}, LONG))).sequences[0]
    task, deltas = await start_stream(pausable, {'input_ids': [11, 12, 13]}, LONG)
    await within(pausable.pause('keep'))
    paused = await within(pausable.engine.stats())
    assert (paused.running, paused.used_slots) == (1, 1), 'in flight: neither finished nor aborted'
    late = await held(pausable, {'input_ids': [5]}, frozen=1)
    assert (await within(pausable.engine.stats())).steps == paused.steps, 'frozen: no step while paused'
    await within(pausable.resume())
    await within(asyncio.gather(task, late))
    assert [t for d in deltas for t in d.token_ids] == expected.tokens


async def test_an_unknown_mode_is_refused(pausable):
    with pytest.raises(InvalidRequestError, match='drain'):
        await pausable.pause('drain')
