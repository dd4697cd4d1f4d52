"""The tiny vision-language model (built here, no downloads) on both engines, shared by the multimodal tests."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

from .tiny_vlm import build_tiny_vlm
from conftest import tiny_sampler

VLM_ENGINE_ARGS = {'dtype': 'float32', 'max_model_len': 512, 'max_num_seqs': 16, 'seed': 0,
                   'limit_mm_per_prompt': {'image': 3}}


@pytest.fixture(scope='session')
def vlm_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp('tiny-vlm'), default_model_dir)


@pytest.fixture(scope='session')
def hf_vlm(vlm_dir: Path):
    """The tiny VLM and its processor loaded with plain transformers (float32): the reference."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype='float32').eval()
    return model, AutoProcessor.from_pretrained(vlm_dir)


@pytest_asyncio.fixture(scope='session')
async def torch_vlm_sampler(vlm_dir: Path) -> AsyncIterator:
    async for sampler in tiny_sampler('torch', vlm_dir, VLM_ENGINE_ARGS):
        yield sampler


@pytest_asyncio.fixture(scope='session')
async def vllm_vlm_sampler(vlm_dir: Path) -> AsyncIterator:
    async for sampler in tiny_sampler('vllm', vlm_dir, VLM_ENGINE_ARGS):
        yield sampler


@pytest.fixture(params=['torch', 'vllm'])
def vlm_sampler(request: pytest.FixtureRequest):
    """Each engine in turn on the tiny VLM."""
    return request.getfixturevalue(f'{request.param}_vlm_sampler')
