"""Chunked prefill on the torch engine's native runner: a prompt longer than a step's token budget is prefilled
chunk by chunk (in the staging slot) in the same forward as the running samples' decode rows, so they keep
getting a token every step; its results equal HF ``generate`` and a full forward."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from twinkle_async import AsyncSampler

from conftest import hf_greedy, load_hf, within
from tiny_model import build_family_model

BUDGET = 512


@pytest.fixture(scope='module')
def long_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family_model(tiny_model_dir, tmp_path_factory.mktemp('long'), 'llama', max_position_embeddings=8192)


def spy_steps(sampler) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Each engine step's decode rows and prefill chunks (prompt length, start, end), recorded as the engine
    runs."""
    steps: list[tuple[int, list[tuple[int, int, int]]]] = []
    runner = sampler.engine.core.runner
    original = runner.step

    def step(rows, chunks):
        steps.append((rows, [(len(c.request.prompt_token_ids), c.start, c.end) for c in chunks]))
        return original(rows, chunks)
    runner.step = step
    return steps


async def test_a_4k_prompt_is_prefilled_in_chunks_while_32_streams_decode(long_model_dir: Path):
    args = {'dtype': 'float32', 'max_model_len': 4300, 'max_num_seqs': 33, 'max_num_batched_tokens': BUDGET}
    prompt = [int(t) for t in torch.randint(10, 1000, (4096,), generator=torch.Generator().manual_seed(0))]
    async with AsyncSampler(str(long_model_dir), engine='torch', engine_args=args) as sampler:
        steps = spy_steps(sampler)
        arrivals: list[list[float]] = [[] for _ in range(32)]

        async def stream(i: int) -> None:
            async for _ in sampler.stream({'input_ids': [5 + i, 6, 7]}, {'max_tokens': 60, 'ignore_eos': True}):
                arrivals[i].append(time.perf_counter())
        streams = [asyncio.create_task(stream(i)) for i in range(32)]
        while min(len(a) for a in arrivals) < 2:
            await within(asyncio.sleep(0.01))
        long = await within(sampler.sample({'input_ids': prompt}, {'max_tokens': 8, 'temperature': 0, 'logprobs': 0,
                                                                   'ignore_eos': True}), 300)
        await within(asyncio.gather(*streams), 300)
    chunked = [(rows, chunk) for rows, chunks in steps for chunk in chunks if chunk[0] == len(prompt)]
    assert len(chunked) >= 4096 // BUDGET, chunked
    assert all(rows == 32 and end - start <= BUDGET - 32 for rows, (_, start, end) in chunked), \
        'each chunk shared its forward with the 32 decode rows, within the budget'
    assert [c[1][1] for c in chunked] == [0, *(c[1][2] for c in chunked[:-1])] and chunked[-1][1][2] == 4096
    gaps = [later - earlier for a in arrivals for earlier, later in zip(a, a[1:])]
    print(f'\nmax inter-token gap of 32 streams while a 4,096-token prompt was prefilled in '
          f'{len(chunked)} chunks: {max(gaps) * 1e3:.0f} ms')
    hf = load_hf(long_model_dir)
    assert long.sequences[0].tokens == hf_greedy(hf, prompt, 8)
    with torch.no_grad():
        full = torch.log_softmax(hf(input_ids=torch.tensor([prompt + long.sequences[0].tokens])).logits[0], -1)
    expected = full[len(prompt) - 1:-1].gather(1, torch.tensor(long.sequences[0].tokens)[:, None])[:, 0]
    got = torch.tensor([row[0][1] for row in long.sequences[0].logprobs])
    assert (got - expected).abs().max().item() < 1e-4


async def test_a_chunked_prompt_serves_every_sample_and_its_prompt_logprobs(long_model_dir: Path):
    args = {'dtype': 'float32', 'max_model_len': 1024, 'max_num_seqs': 8, 'max_num_batched_tokens': 100}
    prompt = list(range(30, 480))
    async with AsyncSampler(str(long_model_dir), engine='torch', engine_args=args) as sampler:
        steps = spy_steps(sampler)
        response = await within(sampler.sample({'input_ids': prompt}, {
            'max_tokens': 6, 'temperature': 0, 'num_samples': 3, 'prompt_logprobs': 1, 'ignore_eos': True}), 120)
    assert sum(1 for _, chunks in steps for _ in chunks) >= len(prompt) // 100, 'prefilled in chunks'
    hf = load_hf(long_model_dir)
    expected = hf_greedy(hf, prompt, 6)
    assert [s.tokens for s in response.sequences] == [expected] * 3, 'each sample got the whole prompt KV'
    with torch.no_grad():
        full = torch.log_softmax(hf(input_ids=torch.tensor([prompt])).logits[0], -1)
    own, rows = response.prompt_logprobs, response.topk_prompt_logprobs
    assert own[0] is None and rows[0] is None and len(own) == len(rows) == len(prompt)
    expected_own = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert (torch.tensor(own[1:]) - expected_own).abs().max().item() < 1e-5
    assert [row[0][0] for row in rows[1:]] == full[:-1].argmax(-1).tolist(), 'the top-1 alternative at each position'
