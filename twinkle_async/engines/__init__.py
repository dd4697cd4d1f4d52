"""Engines behind the :class:`~twinkle_async.engines.base.Engine` protocol, and the factory that builds them."""

from twinkle_async.engines.base import Engine, EngineOutput, EngineRequest, EngineStats, RequestParams
from twinkle_async.engines.factory import ENGINE_KINDS, create_engine

__all__ = ['Engine', 'EngineOutput', 'EngineRequest', 'EngineStats', 'RequestParams', 'ENGINE_KINDS',
           'create_engine']
