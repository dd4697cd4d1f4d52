"""The replica router (pure): least outstanding work, sticky sessions, dead replicas skipped."""

from __future__ import annotations

import pytest

from twinkle_async.ray.router import Router


def test_work_goes_to_the_least_loaded_replica_and_a_list_is_spread():
    router = Router(3)
    assert [router.pick(work) for work in (2, 2, 2, 1)] == [0, 1, 2, 0]  # a list is spread item by item so
    assert router.outstanding == [3, 2, 2]
    router.done(0, 3)
    assert router.pick(1) == 0


def test_a_session_sticks_to_its_replica_until_that_replica_dies():
    router = Router(2)
    first = router.pick(1, session_id='conv')
    router.pick(5)  # load elsewhere does not move the session
    assert all(router.pick(1, session_id='conv') == first for _ in range(3))
    router.alive[first] = False
    assert router.pick(1, session_id='conv') == 1 - first
    assert router.pick(1, session_id='conv') == 1 - first


def test_sessions_are_bounded_and_no_live_replica_is_an_error():
    router = Router(2, max_sessions=2)
    for name in 'abc':
        router.pick(1, session_id=name)
    assert list(router.sessions) == ['b', 'c']
    router.alive = [False, False]
    with pytest.raises(LookupError):
        router.pick(1)
