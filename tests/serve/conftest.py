"""A real uvicorn server on a free localhost port, serving the shared samplers, for the real ``openai`` client."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest_asyncio

from twinkle_async.serve import create_app

API_KEY = 'test-key'


class Served:
    """A running gateway: its base URL and the sampler behind it."""

    def __init__(self, sampler, base_url: str) -> None:
        self.sampler, self.base_url = sampler, base_url

    def client(self, api_key: str = API_KEY, base_url: str = '', **kwargs):
        from openai import AsyncOpenAI
        return AsyncOpenAI(base_url=base_url or self.base_url, api_key=api_key, max_retries=0, timeout=60, **kwargs)


@contextlib.asynccontextmanager
async def serving(sampler) -> AsyncIterator[Served]:
    """``create_app(sampler)`` under a real uvicorn server on a free localhost port, until the block ends."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(create_app(sampler, api_key=API_KEY, model_name='tiny'), host='127.0.0.1',
                                           port=0, log_level='warning'))
    server.capture_signals = contextlib.nullcontext  # the test process keeps its own signal handlers
    running = asyncio.create_task(server.serve())
    while not server.started:
        assert not running.done(), 'the server did not start'
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(sampler, f'http://127.0.0.1:{port}/v1')
    finally:
        server.should_exit = True
        await asyncio.wait_for(running, 30)


@pytest_asyncio.fixture
async def served(sampler) -> AsyncIterator[Served]:
    async with serving(sampler) as running:
        yield running
