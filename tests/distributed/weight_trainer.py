"""A trainer in its own OS process (not Ray), for tests/distributed/test_weight_sender.py: it perturbs a model's
weights, saves them (for a fresh sampler to compare with), streams them to a sampler with ``WeightSender``, then
sends a bad update; prints one JSON line of what happened."""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from twinkle_async import WeightSender
from twinkle_async.errors import WeightUpdateError


def main(address: str, model_dir: str, out_dir: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    weights = model.state_dict()
    with WeightSender(address, bucket_bytes=32 * 2**20) as sender:
        started = time.perf_counter()
        version = sender.send(weights, version=7)
        seconds = time.perf_counter() - started
        try:
            sender.send({'model.layers.0.mlp.nope.weight': torch.zeros(2, 2)})
            refused = ''
        except WeightUpdateError as exc:
            refused = str(exc)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    print(json.dumps({'version': version, 'seconds': seconds, 'bytes': nbytes, 'refused': refused}))


if __name__ == '__main__':
    main(*sys.argv[1:4])
