"""GPU check of the vLLM engine's platform settings (issue 17), for a CUDA machine with vLLM installed.

On the default model (embedded; no downloads): (1) vLLM's own GPU defaults are kept (dtype 'auto', chunked
prefill) and greedy tokens match HF ``generate`` for a few prompts (bf16: compared token by token up to the first
difference, reported); (2) ``update_weights`` of a subset applies in place (``load_weights`` of the changed tensors):
greedy tokens then equal a fresh engine started on a checkpoint holding those weights; (3) sleep mode:
``sleep(2)`` -> ``update_weights`` -> ``wake_up`` serves the new weights, ``sleep(1)`` -> ``wake_up`` the same
ones; (4) with 2+ GPUs, ``tensor_parallel_size=2`` gives the tokens of tp=1. Prints PASS/FAIL per check; exit
code 1 on any failure.

    PYTHONPATH=. python scripts/gpu_vllm_check.py [defaults] [update] [sleep] [tp]    # default: all
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import torch

import twinkle_async as ta

GREEDY = {'max_tokens': 24, 'temperature': 0, 'ignore_eos': True}
PROMPTS = [{'messages': [{'role': 'user', 'content': text}]}
           for text in ('What is the capital of France?', 'Name three prime numbers.', 'Write a haiku about rain.')]
ENGINE_ARGS = {'max_model_len': 1024, 'gpu_memory_utilization': 0.3, 'enable_sleep_mode': True}
FAILURES: list[str] = []


def check(name: str, passed: bool, detail: str = '') -> None:
    print(f"{'PASS' if passed else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not passed:
        FAILURES.append(name)


async def greedy(sampler: ta.AsyncSampler) -> list[list[int]]:
    return [r.sequences[0].tokens for r in await sampler.sample(PROMPTS, GREEDY)]


def perturbed(model_dir: Path, out_dir: Path) -> dict[str, torch.Tensor]:
    """The MLP weights of every layer, perturbed; a checkpoint with them saved to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    changed = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if '.mlp.' in name:
                parameter.add_(0.05 * parameter.float().std().to(parameter.dtype)
                               * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
                changed[name] = parameter.detach().clone()
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return changed


async def defaults(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM
    async with ta.AsyncSampler(str(model_dir), engine='vllm', engine_args=ENGINE_ARGS) as sampler:
        config = sampler.engine.llm.vllm_config
        check('defaults: dtype auto (bf16 here)', str(config.model_config.dtype) == 'torch.bfloat16',
              str(config.model_config.dtype))
        check('defaults: chunked prefill on', bool(config.scheduler_config.enable_chunked_prefill))
        ours = await greedy(sampler)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        agree = []
        for prompt, tokens in zip(PROMPTS, ours):
            ids = sampler.template.encode(prompt)['input_ids']
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]).cuda(), max_new_tokens=24, do_sample=False)[0, len(ids):]
            same = next((i for i, (a, b) in enumerate(zip(tokens, hf.tolist())) if a != b), len(tokens))
            agree.append(same)
        check('defaults: greedy bf16 tokens agree with HF generate (first 8 at least)', min(agree) >= 8,
              f'agreeing prefix lengths {agree}')


async def update(model_dir: Path, scratch: Path) -> None:
    changed = perturbed(model_dir, scratch / 'trained')
    async with ta.AsyncSampler(str(model_dir), engine='vllm', engine_args=ENGINE_ARGS) as sampler:
        before = await greedy(sampler)
        await sampler.update_weights(changed)
        after = await greedy(sampler)
    async with ta.AsyncSampler(str(scratch / 'trained'), engine='vllm', engine_args=ENGINE_ARGS) as fresh:
        expected = await greedy(fresh)
    check('update: a partial update in place = a fresh engine on those weights', after == expected)
    check('update: the update changed the answers', after != before)


async def sleep(model_dir: Path, scratch: Path) -> None:
    changed = perturbed(model_dir, scratch / 'trained-sleep')
    async with ta.AsyncSampler(str(model_dir), engine='vllm', engine_args=ENGINE_ARGS) as sampler:
        before = await greedy(sampler)
        await sampler.sleep(1)
        await sampler.wake_up()
        check('sleep 1 -> wake: same answers', await greedy(sampler) == before)
        await sampler.sleep(2)
        await sampler.update_weights(changed)
        await sampler.wake_up()
        woken = await greedy(sampler)
    async with ta.AsyncSampler(str(scratch / 'trained-sleep'), engine='vllm', engine_args=ENGINE_ARGS) as fresh:
        check('sleep 2 -> update -> wake: the new weights are served', woken == await greedy(fresh))


async def tensor_parallel(model_dir: Path) -> None:
    if torch.cuda.device_count() < 2:
        print('SKIP tp: fewer than 2 GPUs')
        return
    results = []
    for tp in (1, 2):
        async with ta.AsyncSampler(str(model_dir), engine='vllm',
                                   engine_args={**ENGINE_ARGS, 'tensor_parallel_size': tp}) as sampler:
            results.append(await greedy(sampler))
    check('tp: tensor_parallel_size=2 gives the tokens of tp=1', results[0] == results[1])


async def main(selected: list[str]) -> None:
    model_dir = ta.resolve_model(ta.DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as scratch:
        if 'defaults' in selected:
            await defaults(model_dir)
        if 'update' in selected:
            await update(model_dir, Path(scratch))
        if 'sleep' in selected:
            await sleep(model_dir, Path(scratch))
        if 'tp' in selected:
            await tensor_parallel(model_dir)
    print('FAILED: ' + ', '.join(FAILURES) if FAILURES else 'all checks passed')
    sys.exit(1 if FAILURES else 0)


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1:] or ['defaults', 'update', 'sleep', 'tp']))
