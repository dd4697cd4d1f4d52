"""The two engines agree with each other on the same requests."""

from __future__ import annotations

import asyncio

from conftest import chat, within


async def test_greedy_tokens_and_logprobs_agree_between_engines(torch_sampler, vllm_sampler):
    params = {'max_tokens': 24, 'temperature': 0, 'logprobs': 3, 'prompt_logprobs': 2, 'ignore_eos': True}
    prompts = [chat(p) for p in ('def main():', 'import os', 'class A:', 'x = [1, 2')]
    torch_out, vllm_out = await within(asyncio.gather(torch_sampler.sample(prompts, params),
                                                      vllm_sampler.sample(prompts, params)))
    assert len(torch_out) == len(vllm_out) == len(prompts)
    for a, b in zip(torch_out, vllm_out):
        assert a.prompt_token_ids == b.prompt_token_ids
        sa, sb = a.sequences[0], b.sequences[0]
        assert sa.tokens == sb.tokens and len(sa.tokens) == 24
        assert [len(row) for row in sa.logprobs] == [len(row) for row in sb.logprobs] == [4] * 24
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        for row_a, row_b in zip(sa.logprobs, sb.logprobs):
            assert [t for t, _ in row_a] == [t for t, _ in row_b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(row_a, row_b)) < 1e-4
        for lp_a, lp_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert abs(lp_a - lp_b) < 1e-4
