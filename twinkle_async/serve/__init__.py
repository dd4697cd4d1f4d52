"""The OpenAI-compatible gateway: ``twinkle-async serve`` or ``create_app(sampler)`` to embed it."""

from twinkle_async.serve.app import MAX_BODY_BYTES, create_app
from twinkle_async.serve.sessions import Segment, Session, SessionStore

__all__ = ['create_app', 'MAX_BODY_BYTES', 'SessionStore', 'Session', 'Segment']
