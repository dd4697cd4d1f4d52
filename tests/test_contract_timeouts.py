"""Engine contract: per-request timeouts (abort with partial tokens) and a bound on requests in flight."""

from __future__ import annotations

import asyncio

import pytest

from twinkle_async.errors import InvalidRequestError, OverloadedError

from conftest import within

LONG = {'max_tokens': 400, 'temperature': 0, 'ignore_eos': True}


@pytest.fixture
async def bounded(sampler):
    """The shared sampler, resumed and unbounded again after the test."""
    yield sampler
    await within(sampler.resume())
    sampler.admission.max_pending = None


async def test_a_timed_out_stream_ends_with_abort_and_its_partial_tokens(bounded):
    deltas = []
    first = asyncio.Event()

    async def consume() -> None:
        async for delta in bounded.stream({'input_ids': [5, 6, 7]}, LONG, timeout=1.0):
            deltas.append(delta)
            first.set()

    task = asyncio.create_task(consume())
    await within(first.wait())
    await within(bounded.pause('keep'))  # it cannot finish now: only the timeout can end it
    await within(task)
    assert deltas[-1].finish_reason == 'abort' and 0 < sum(len(d.token_ids) for d in deltas) < 400
    stats = await within(bounded.engine.stats())
    assert (stats.running, stats.used_slots) == (0, 0)


async def test_a_timed_out_sample_returns_what_it_has(bounded):
    await within(bounded.pause('abort'))  # held: the timeout ends it before it starts
    response = await within(bounded.sample({'input_ids': [5, 6]}, LONG, num_samples=2, timeout=0.2))
    assert [s.stop_reason for s in response.sequences] == ['abort', 'abort']
    assert all(s.tokens == [] for s in response.sequences)


async def test_requests_past_the_bound_are_refused_at_once_and_the_others_finish(bounded):
    bounded.admission.max_pending = 2
    await within(bounded.pause('abort'))
    held = [asyncio.create_task(bounded.sample({'input_ids': [5, i]}, {'max_tokens': 4})) for i in range(2)]
    while bounded.admission.pending < 2:
        await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError, match='max_pending_requests=2'):
        await within(bounded.sample({'input_ids': [9]}, {'max_tokens': 4}))
    results = await within(bounded.sample([{'input_ids': [9]}], {'max_tokens': 4}, return_exceptions=True))
    assert isinstance(results[0], OverloadedError)
    await within(bounded.resume())
    assert all(len(r.sequences[0].tokens) > 0 for r in await within(asyncio.gather(*held)))
    assert bounded.admission.pending == 0


@pytest.mark.parametrize('timeout', [0, -1, 'soon', True])
async def test_a_bad_timeout_is_named(bounded, timeout):
    with pytest.raises(InvalidRequestError, match='timeout must be a positive number'):
        await within(bounded.sample({'input_ids': [5]}, {'max_tokens': 2}, timeout=timeout))
