"""GPU check of the torch engine (run on a CUDA machine, no downloads): parity and throughput.

Builds a SmolLM2-shaped Llama (random weights, a small BPE tokenizer trained on stdlib sources), then
(1) greedy float32 tokens of the torch engine on CUDA == ``model.generate``, (2) bf16 throughput of the
engine at a large batch vs ``model.generate`` in padded batches of 8 on the same GPU.

    PYTHONPATH=. python scripts/gpu_check.py
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
from tiny_model import build_tiny_model  # noqa: E402

import twinkle_async as ta  # noqa: E402

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


def main() -> None:
    print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build(Path(scratch))
        asyncio.run(parity(model_dir))
        ours = asyncio.run(throughput(model_dir, 256, 128))
        base = hf_static(model_dir, 64, 128)
        print(f'RATIO ours / HF static batch 8: {ours / base:.2f}', flush=True)


if __name__ == '__main__':
    main()
