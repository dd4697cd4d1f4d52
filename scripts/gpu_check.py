"""GPU check of the torch engine (run on a CUDA machine, no downloads): parity, throughput, weights.

Builds a SmolLM2-shaped Llama (random weights, a small BPE tokenizer trained on stdlib sources), then
(1) greedy float32 tokens of the torch engine on CUDA == ``model.generate``, (2) bf16 throughput of the
engine at a large batch vs ``model.generate`` in padded batches of 8 on the same GPU, (3) weights:
LoRA == PEFT in a mixed batch, a 'keep' rollout across an update, update_weights GB/s vs ``copy_``.

    PYTHONPATH=. python scripts/gpu_check.py [parity] [throughput] [weights]    # default: all
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
import twinkle_async as ta  # noqa: E402

from tiny_model import build_tiny_model  # noqa: E402

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, max_position_embeddings=2048)


def build(directory: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    build_tiny_model(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **SMOLLM2_SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def prompts(n: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, 1000) for _ in range(rng.randint(32, 256))] for _ in range(n)]


async def parity(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    batch = prompts(8, random.Random(1))
    async with ta.AsyncSampler(str(model_dir), engine_args={'dtype': 'float32', 'device': 'cuda'}) as s:
        ours = await s.sample([{'input_ids': p} for p in batch], {'max_tokens': 32, 'temperature': 0,
                                                                 'ignore_eos': True})
    same = 0
    for p, r in zip(batch, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device='cuda'), max_new_tokens=32,
                              do_sample=False)[0, len(p):].tolist()
        same += ref == r.sequences[0].tokens
    print(f'PARITY float32 cuda: {same}/{len(batch)} requests token-identical to model.generate', flush=True)


async def throughput(model_dir: Path, num: int, max_tokens: int) -> float:
    batch = prompts(num, random.Random(2))
    args = {'dtype': 'bfloat16', 'device': 'cuda', 'max_num_seqs': num, 'max_model_len': 512,
            'kv_cache_memory_bytes': 16 * 2**30}
    async with ta.AsyncSampler(str(model_dir), engine_args=args) as s:
        params = {'max_tokens': max_tokens, 'temperature': 0, 'ignore_eos': True}
        await s.sample([{'input_ids': p} for p in batch[:4]], params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = await s.sample([{'input_ids': p} for p in batch], params)
        seconds = time.perf_counter() - start
    tokens = sum(len(r.sequences[0].tokens) for r in out)
    print(f'OURS bf16 cuda: {num} requests x {max_tokens} tokens: {tokens / seconds:.0f} tok/s', flush=True)
    return tokens / seconds


def hf_static(model_dir: Path, num: int, max_tokens: int) -> float:
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf.generation_config.eos_token_id = None
    batch = prompts(num, random.Random(2))
    start = time.perf_counter()
    for i in range(0, num, 8):
        chunk = batch[i:i + 8]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device='cuda')
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device='cuda')
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    rate = num * max_tokens / (time.perf_counter() - start)
    print(f'HF generate static batch 8 bf16 cuda: {rate:.0f} tok/s', flush=True)
    return rate


async def weights(model_dir: Path, scratch: Path) -> None:
    """LoRA parity in a mixed batch, a kept rollout across an update, and update speed, all on CUDA."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def hf(adapter: Path | None = None) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.generation_config.eos_token_id = None
        return (PeftModel.from_pretrained(model, adapter) if adapter else model).cuda().eval()

    adapters = {}
    for name, seed in (('a', 1), ('b', 2)):
        torch.manual_seed(seed)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                              LoraConfig(r=16, lora_alpha=32, target_modules=['q_proj', 'v_proj', 'down_proj'],
                                         init_lora_weights=False))
        peft.save_pretrained(scratch / name)
        adapters[name] = scratch / name
    batch = prompts(6, random.Random(3))
    names = ['a', 'b', '', 'a', 'b', '']
    greedy = {'max_tokens': 24, 'temperature': 0, 'ignore_eos': True}
    async with ta.AsyncSampler(str(model_dir), engine_args={'dtype': 'float32', 'device': 'cuda'}) as s:
        for name, path in adapters.items():
            await s.add_adapter(name, path)
        out = await asyncio.gather(*(s.sample({'input_ids': p}, greedy, n) for p, n in zip(batch, names)))
        refs = {n: hf(adapters.get(n)) for n in set(names)}
        same = 0
        for p, n, r in zip(batch, names, out):
            with torch.no_grad():
                ref = refs[n].generate(torch.tensor([p], device='cuda'), max_new_tokens=24, do_sample=False)
            same += ref[0, len(p):].tolist() == r.sequences[0].tokens
        print(f'LORA mixed batch float32 cuda: {same}/{len(batch)} rows token-identical to PEFT/HF', flush=True)
        new = {k: v.cuda() * 1.01 for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
        task = asyncio.create_task(s.sample({'input_ids': batch[0]}, {**greedy, 'max_tokens': 200}))
        while (await s.engine.stats()).running == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # let it sample a few tokens on the old weights
        await s.pause('keep')
        version = await s.update_weights(new)
        await s.resume()
        versions = (await task).sequences[0].weight_versions
        print(f'KEEP rollout across an update: {versions.count(0)} tokens v0, {versions.count(version)} '
              f'tokens v{version}, {len(versions)} in all', flush=True)
        full_bytes = sum(t.numel() * t.element_size() for t in new.values())
        for source, tensors in (('cuda', new), ('cpu', {k: v.cpu() for k, v in new.items()})):
            twin = {k: torch.empty_like(v, device='cuda') for k, v in tensors.items()}
            torch.cuda.synchronize()
            start = time.perf_counter()
            for k, v in tensors.items():
                twin[k].copy_(v)
            torch.cuda.synchronize()
            floor = time.perf_counter() - start
            start = time.perf_counter()
            await s.update_weights(tensors)
            torch.cuda.synchronize()
            took = time.perf_counter() - start
            print(f'UPDATE full float32 from {source}: {full_bytes / took / 1e9:.2f} GB/s '
                  f'(copy_ {full_bytes / floor / 1e9:.2f} GB/s, ratio {floor / took:.2f})', flush=True)


def main() -> None:
    sections = set(sys.argv[1:]) or {'parity', 'throughput', 'weights'}
    print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build(Path(scratch) / 'model')
        if 'parity' in sections:
            asyncio.run(parity(model_dir))
        if 'throughput' in sections:
            ours = asyncio.run(throughput(model_dir, 256, 128))
            base = hf_static(model_dir, 64, 128)
            print(f'RATIO ours / HF static batch 8: {ours / base:.2f}', flush=True)
        if 'weights' in sections:
            asyncio.run(weights(model_dir, Path(scratch)))


if __name__ == '__main__':
    main()
