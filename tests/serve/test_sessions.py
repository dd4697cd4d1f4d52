"""Session bookkeeping (pure): continuation by ids or by text, new segments, and the LRU + TTL bound."""

from __future__ import annotations

from twinkle_async.serve.sessions import Session, SessionStore

TEXT = {1: 'a', 2: 'b', 3: 'c', 4: 'cd', 5: 'd', 6: 'x'}


def decode(ids):
    return ''.join(TEXT[i] for i in ids)


def encode(text):
    return [next(k for k, v in TEXT.items() if v == ch) for ch in text]


def test_turns_continue_by_ids_or_by_text_and_otherwise_start_a_segment():
    session = Session('s')
    prompt, segment = session.prompt_for([1, 2], decode, encode)
    assert prompt == [1, 2] and session.segments == [], 'kept only once the turn is recorded'
    session.add_turn(segment, prompt, [3], [[(3, -0.5)]], [7], 'length')
    prompt, same = session.prompt_for([1, 2, 3, 5], decode, encode)  # ids continue
    assert same is segment and prompt == [1, 2, 3, 5]
    session.add_turn(same, prompt, [6], None, [8], 'stop')
    assert segment.token_ids == [1, 2, 3, 5, 6] and segment.loss_mask == [0, 0, 1, 0, 1]
    assert segment.logprobs == [None, None, -0.5, None, None] and segment.weight_versions == [None, None, 7, None, 8]
    prompt, same = session.prompt_for([1, 2, 4, 6, 1], decode, encode)  # 'c'+'d' re-tokenized as 'cd': by text
    assert same is segment and prompt == [1, 2, 3, 5, 6, 1], 'the sampled ids are kept, only the new text encoded'
    prompt, other = session.prompt_for([6, 6], decode, encode)
    assert other is not segment and prompt == [6, 6] and session.restarts == 0
    session.add_turn(other, prompt, [1], None, None, 'stop')
    assert session.restarts == 1 and session.segments == [segment, other]


def test_the_store_drops_the_least_recently_used_and_the_expired():
    now = [0.0]
    store = SessionStore(max_sessions=2, ttl_s=10, clock=lambda: now[0])
    store.get_or_create('a')
    store.get_or_create('b')
    store.get_or_create('a')  # a is now the most recent
    store.get_or_create('c')
    assert store.get('b') is None and store.get('a') is not None and len(store) == 2
    now[0] = 11
    assert store.get('a') is None and len(store) == 0, 'expired ten seconds after their last use'
    assert not store.delete('a')
