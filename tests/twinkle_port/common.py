"""What the ported cookbook flows share: the model id, tolerances, a trainer's logprobs."""

from __future__ import annotations

MODEL_ID = 'smollm2-135m-instruct'
TOLERANCE = 1e-4
"""float32 logprobs vs one transformers forward of the whole sequence (decoding in batches against a KV cache sums
in another order: up to ~1.5e-5 apart on the torch engine over 40 tokens; tests/test_scoring_and_logprobs.py holds
prompt scoring to 1e-5 there)."""


def logprobs_of(model, ids: list[int], start: int):
    """Raw log-probabilities a trainer's forward gives ``ids[start:]`` (each given the tokens before it)."""
    import torch
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    targets = torch.tensor(ids[start:])
    return logprobs[start - 1:-1].gather(1, targets.unsqueeze(1)).squeeze(1)
