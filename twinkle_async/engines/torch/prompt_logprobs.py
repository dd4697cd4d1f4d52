"""Prompt logprob rows from prefill logits."""

from __future__ import annotations

from typing import Sequence

import torch

from twinkle_async.data_format.outputs import LogprobRow

__all__ = ['prompt_logprob_rows']


def prompt_logprob_rows(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[LogprobRow]:
    """Row ``i`` is ``(targets[i], logprob)`` then the top-``k`` alternatives, where ``logits[i]`` are the logits
    that predict ``targets[i]`` (the prompt's next token; rows beyond ``len(targets)`` are ignored)."""
    logprobs = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
    own = logprobs.gather(1, torch.tensor(targets, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    if k == 0:
        return [[(t, lp)] for t, lp in zip(targets, own)]
    top_lps, top_ids = logprobs.topk(k, dim=-1)
    return [[(token, lp), *zip(ids, lps)] for token, lp, ids, lps in zip(targets, own, top_ids.tolist(),
                                                                            top_lps.tolist())]
