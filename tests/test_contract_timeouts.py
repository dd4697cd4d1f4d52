"""Engine contract: per-request timeouts (abort with partial tokens) and a bound on requests in flight."""

from __future__ import annotations

import asyncio

import pytest

from twinkle_async.errors import InvalidRequestError, OverloadedError

from conftest import counters_when, hf_greedy, start_stream, within

LONG = {'max_tokens': 400, 'temperature': 0, 'ignore_eos': True}


@pytest.fixture
async def bounded(sampler):
    """The shared sampler, resumed and unbounded again after the test."""
    yield sampler
    await within(sampler.resume())
    sampler.admission.max_pending = None


async def test_a_timed_out_stream_ends_with_abort_and_its_partial_tokens(bounded, hf_tiny):
    task, deltas = await start_stream(bounded, {'input_ids': [5, 6, 7]}, LONG, timeout=1.0)
    await within(bounded.pause('keep'))  # it cannot finish now: only the timeout can end it
    await within(task)
    tokens = [t for d in deltas for t in d.token_ids]
    assert deltas[-1].finish_reason == 'abort' and 0 < len(tokens) < 400
    assert tokens == hf_greedy(hf_tiny[0], [5, 6, 7], len(tokens)), 'the partial tokens are the greedy ones'
    stats = await within(bounded.engine.stats())
    assert (stats.running, stats.used_slots) == (0, 0)


async def test_a_timed_out_sample_returns_what_it_has(bounded):
    await within(bounded.pause('abort'))  # held: the timeout ends it before it starts
    aborted_before = (await within(bounded.engine.stats())).aborted
    response = await within(bounded.sample({'input_ids': [5, 6]}, LONG, num_samples=2, timeout=0.2))
    assert [s.stop_reason for s in response.sequences] == ['abort', 'abort']
    assert all(s.tokens == [] for s in response.sequences)
    stats = await within(counters_when(bounded, lambda s: s.aborted > aborted_before))
    assert (stats.aborted - aborted_before, stats.waiting, stats.running) == (1, 0, 0), 'the engine dropped it'


async def test_requests_past_the_bound_are_refused_at_once_and_the_others_finish(bounded):
    bounded.admission.max_pending = 2
    await within(bounded.pause('abort'))
    four = {'max_tokens': 4, 'ignore_eos': True}
    held = [asyncio.create_task(bounded.sample({'input_ids': [5, i]}, four)) for i in range(2)]
    await within(counters_when(bounded, lambda s: s.waiting == 2))
    assert bounded.admission.pending == 2
    with pytest.raises(OverloadedError, match='max_pending_requests=2'):
        await within(bounded.sample({'input_ids': [9]}, four))
    results = await within(bounded.sample([{'input_ids': [9]}], four, return_exceptions=True))
    assert isinstance(results[0], OverloadedError)
    stats = await within(bounded.engine.stats())
    assert (stats.waiting, bounded.admission.pending) == (2, 2), 'the refused ones never reached the engine'
    await within(bounded.resume())
    assert [len(r.sequences[0].tokens) for r in await within(asyncio.gather(*held))] == [4, 4]
    assert bounded.admission.pending == 0


@pytest.mark.parametrize('timeout', [0, -1, 'soon', True])
async def test_a_bad_timeout_is_named(bounded, timeout):
    with pytest.raises(InvalidRequestError, match='timeout must be a positive number'):
        await within(bounded.sample({'input_ids': [5]}, {'max_tokens': 2}, timeout=timeout))
