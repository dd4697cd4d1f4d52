"""``serve(...)``: start a sampler and the gateway under uvicorn until Ctrl-C (what ``twinkle-async serve`` runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any, Iterator, Mapping, Optional

from twinkle_async.sampler import AsyncSampler
from twinkle_async.serve.app import create_app

__all__ = ['serve', 'LOCAL_HOSTS']

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')


async def serve(model: str, engine: str, engine_args: Mapping[str, Any], host: str = '127.0.0.1', port: int = 8000,
                api_key: Optional[str] = None, ray_replicas: Optional[int] = None) -> None:
    """Serve ``model`` until interrupted; prints ``serving <model> at http://host:port/v1`` once ready. On
    Ctrl-C (SIGINT/SIGTERM) the server stops taking requests, those in flight are aborted, the engine closes.

    Args:
        ray_replicas: run that many engine replicas as Ray actors (one CPU or GPU each) instead of in process.
    """
    import uvicorn

    if host not in LOCAL_HOSTS and not api_key:
        logger.warning('serving on %s without --api-key: anyone who can reach this address can use the model', host)
    async with _sampler(model, engine, engine_args, ray_replicas) as sampler:
        config = uvicorn.Config(create_app(sampler, api_key=api_key, model_name=model), host=host, port=port,
                                log_level='warning', timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        server.capture_signals = lambda: _stop_on_signals(server)  # type: ignore[method-assign]
        running = asyncio.create_task(server.serve())
        while not server.started and not running.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            print(f'serving {model} at http://{host}:{bound}/v1', flush=True)
        await running
        print('stopped', file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_signals(server: Any) -> Iterator[None]:
    """Ctrl-C / SIGTERM stop the server (a second one forces it), and the process then exits normally: uvicorn's own
    handling would re-raise the signal once it has stopped."""
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, server.handle_exit, number, None)
    try:
        yield
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)


def _sampler(model: str, engine: str, engine_args: Mapping[str, Any], ray_replicas: Optional[int]) -> AsyncSampler:
    if ray_replicas is None:
        return AsyncSampler(model, engine, engine_args)
    import torch

    from twinkle_async import DeviceGroup, DeviceMesh, initialize

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    initialize('ray', groups=[DeviceGroup(name='serve', ranks=ray_replicas, device_type=device)])
    return AsyncSampler(model, engine, engine_args, remote_group='serve',
                        device_mesh=DeviceMesh.from_sizes(dp_size=ray_replicas))
