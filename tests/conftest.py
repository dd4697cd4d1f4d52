"""Shared fixtures: a tiny model built locally (no downloads), the embedded default model, engines."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tiny_model import build_tiny_lora, build_tiny_model

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

ENGINES = ['torch', 'vllm']
WAIT = 120  # seconds: the longest any single await in a test may take before it counts as a hang


RAY_TEST_ENVIRONMENT = {'RAY_USAGE_STATS_ENABLED': '0', 'RAY_memory_monitor_refresh_ms': '0',
                        'RAY_AUTH_MODE': 'disabled'}


@pytest.fixture(scope='session')
def ray_environment():
    """What a local test cluster needs set before ``ray.init`` (values already set by the user are kept)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in RAY_TEST_ENVIRONMENT.items():
            if key not in os.environ:
                patch.setenv(key, value)
        yield


@contextlib.contextmanager
def local_ray_cluster(group: str, object_store_mib: int = 256, cpus_per_worker: int = 1) -> Iterator[None]:
    """A local Ray cluster of 2 CPUs holding one CPU group named ``group`` (2 workers of 1 CPU, or 1 of 2),
    shut down after."""
    import ray

    from twinkle_async import DeviceGroup, initialize
    initialize('ray', groups=[DeviceGroup(name=group, ranks=2, device_type='cpu', gpus_per_worker=cpus_per_worker)],
               num_cpus=2, object_store_memory=object_store_mib * 2**20)
    try:
        yield
    finally:
        initialize('local')
        ray.shutdown()


@contextlib.asynccontextmanager
async def ray_sampler(group: str, model_dir: Path, *, object_store_mib: int = 256, cpus_per_worker: int = 1,
                      **sampler_kwargs) -> AsyncIterator:
    """An ``AsyncSampler`` on ``model_dir`` with ``remote_group=group`` in a :func:`local_ray_cluster` holding that
    group, started (within 300 s) until the block ends; then closed and the cluster shut down."""
    from twinkle_async import AsyncSampler
    with local_ray_cluster(group, object_store_mib, cpus_per_worker):
        sampler = AsyncSampler(str(model_dir), remote_group=group, **sampler_kwargs)
        await within(sampler.start(), 300)
        try:
            yield sampler
        finally:
            await sampler.close()


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp('tiny-model'))


@pytest.fixture(scope='session')
def default_model_dir() -> Path:
    from twinkle_async.models import resolve_model
    return resolve_model('smollm2-135m-instruct')


@pytest.fixture(scope='session')
def hf_tiny(tiny_model_dir: Path):
    """The tiny model and tokenizer loaded with plain transformers (float32), for parity checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype='float32').eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope='session')
def tiny_model_b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture and tokenizer with other weights: what a trainer would send."""
    return build_tiny_model(tmp_path_factory.mktemp('tiny-model-b'), seed=1)


@pytest.fixture(scope='session')
def lora_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT adapters on the tiny model: 'a' (r=8) and 'a2' (its shape, other weights), 'b' (r=16)."""
    root = tmp_path_factory.mktemp('loras')
    return {'a': build_tiny_lora(tiny_model_dir, root / 'a', 'a', seed=1),
            'a2': build_tiny_lora(tiny_model_dir, root / 'a2', 'a', seed=2),
            'b': build_tiny_lora(tiny_model_dir, root / 'b', 'b', seed=3)}


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """Greedy tokens of a transformers (or PEFT) model: the reference every engine must match (``ignore_eos``: past
    an EOS too, as a request with ``ignore_eos`` goes on)."""
    import torch
    stop = {'eos_token_id': None} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             **stop)
    return out[0, len(prompt_ids):].tolist()


def load_hf(model_dir: Path, adapter_dir: Path | None = None):
    """A float32 transformers model from ``model_dir``, with a PEFT adapter when given."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype='float32').eval()
    if adapter_dir is None:
        return model
    from peft import PeftModel
    return PeftModel.from_pretrained(model, adapter_dir).eval()


TINY_ENGINE_ARGS = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': 32, 'seed': 0}


async def tiny_sampler(engine: str, model_dir: Path, engine_args: dict = TINY_ENGINE_ARGS) -> AsyncIterator:
    """A sampler on ``engine`` for ``model_dir`` (a tiny model) until the generator is closed."""
    from twinkle_async import AsyncSampler
    async with AsyncSampler(str(model_dir), engine=engine, engine_args=engine_args) as s:
        yield s


@pytest_asyncio.fixture(scope='session')
async def torch_sampler(tiny_model_dir: Path) -> AsyncIterator:
    """The torch engine on the tiny model, shared by the whole session."""
    async for s in tiny_sampler('torch', tiny_model_dir):
        yield s


@pytest_asyncio.fixture(scope='session')
async def vllm_sampler(tiny_model_dir: Path) -> AsyncIterator:
    """The vLLM engine on the tiny model, shared by the whole session (vLLM starts in ~20 s)."""
    async for s in tiny_sampler('vllm', tiny_model_dir):
        yield s


@pytest.fixture(params=ENGINES)
def sampler(request: pytest.FixtureRequest):
    """Each engine in turn: contract tests run unchanged on both."""
    return request.getfixturevalue(f'{request.param}_sampler')


def child_pids() -> set[int]:
    """Process ids of every descendant of this process (vLLM engine cores among them)."""
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)}


def chat(text: str) -> dict:
    """A one-message user trajectory."""
    return {'messages': [{'role': 'user', 'content': text}]}


async def within(awaitable, seconds: float = WAIT):
    """Await with a timeout so a bug shows up as a failure, not a hang."""
    return await asyncio.wait_for(awaitable, seconds)


async def start_stream(sampler, inputs: dict, params: dict, *args, **kwargs) -> tuple[asyncio.Task, list]:
    """A task consuming ``sampler.stream(inputs, params, *args, **kwargs)``; returns once its first delta has
    arrived, with the list its deltas go to (a stream that fails first raises its error here)."""
    first, deltas = asyncio.Event(), []

    async def consume() -> None:
        async for delta in sampler.stream(inputs, params, *args, **kwargs):
            deltas.append(delta)
            first.set()

    task = asyncio.create_task(consume())
    first_delta = asyncio.ensure_future(first.wait())
    await within(asyncio.wait({task, first_delta}, return_when=asyncio.FIRST_COMPLETED))
    first_delta.cancel()
    if not first.is_set():
        task.result()
    return task, deltas


async def counters_when(sampler, condition):
    """The engine's counters once ``condition`` holds for them (polled: requests reach the engine through the
    event loop, aborts of dropped streams through their finalizers)."""
    while not condition(stats := await sampler.engine.stats()):
        await asyncio.sleep(0.005)
    return stats


def on_each_step(sampler, record) -> None:
    """Call ``record(rows, chunks)`` on the torch engine's thread before each of its forwards."""
    core = sampler.engine.core
    original = core.runner.step

    def step(rows, chunks):
        record(rows, chunks)
        return original(rows, chunks)
    core.runner.step = step


def assert_all_blocks_returned(sampler) -> None:
    """The native runner's block pool holds no block and no reservation."""
    pool = sampler.engine.core.cache.pool
    assert (pool.used, pool.reserved) == (0, 0), 'every block and reservation came back'
