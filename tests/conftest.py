"""Shared fixtures: a tiny model built locally (no downloads), the embedded default model, engines."""

from __future__ import annotations

import asyncio
import glob
import os
import sysconfig
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

ENGINES = ['torch', 'vllm']
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WAIT = 120  # seconds: the longest any single await in a test may take before it counts as a hang


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer trained on stdlib sources + a 2-layer Llama with random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))[:60]
    tokenizer.train(sources, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                   bos_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    config = LlamaConfig(vocab_size=fast.vocab_size if hasattr(fast, 'vocab_size') else len(fast),
                         hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    return directory


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
