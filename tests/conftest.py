"""Shared fixtures: a tiny model built locally (no downloads), the embedded default model, engines."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

from tiny_model import build_tiny_model

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

ENGINES = ['torch', 'vllm']
WAIT = 120  # seconds: the longest any single await in a test may take before it counts as a hang


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


TINY_ENGINE_ARGS = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': 32, 'seed': 0}


async def _tiny_sampler(engine: str, model_dir: Path) -> AsyncIterator:
    from twinkle_async import AsyncSampler
    async with AsyncSampler(str(model_dir), engine=engine, engine_args=TINY_ENGINE_ARGS) as s:
        yield s


@pytest_asyncio.fixture(scope='session')
async def torch_sampler(tiny_model_dir: Path) -> AsyncIterator:
    """The torch engine on the tiny model, shared by the whole session."""
    async for s in _tiny_sampler('torch', tiny_model_dir):
        yield s


@pytest_asyncio.fixture(scope='session')
async def vllm_sampler(tiny_model_dir: Path) -> AsyncIterator:
    """The vLLM engine on the tiny model, shared by the whole session (vLLM starts in ~20 s)."""
    async for s in _tiny_sampler('vllm', tiny_model_dir):
        yield s


@pytest.fixture(params=ENGINES)
def sampler(request: pytest.FixtureRequest):
    """Each engine in turn: contract tests run unchanged on both."""
    return request.getfixturevalue(f'{request.param}_sampler')


def chat(text: str) -> dict:
    """A one-message user trajectory."""
    return {'messages': [{'role': 'user', 'content': text}]}


async def within(awaitable, seconds: float = WAIT):
    """Await with a timeout so a bug shows up as a failure, not a hang."""
    return await asyncio.wait_for(awaitable, seconds)


async def start_long_stream(sampler, text: str, max_tokens: int) -> asyncio.Task:
    """A task consuming a long stream; returns once its first token has arrived."""
    first_token = asyncio.Event()

    async def consume() -> None:
        async for _ in sampler.stream(chat(text), {'max_tokens': max_tokens, 'ignore_eos': True}):
            first_token.set()

    task = asyncio.create_task(consume())
    await within(first_token.wait())
    return task
