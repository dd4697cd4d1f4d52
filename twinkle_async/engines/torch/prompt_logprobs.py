"""Prompt logprob rows from prefill logits."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from twinkle_async.data_format.outputs import LogprobRow

__all__ = ['prompt_logprob_rows']


def prompt_logprob_rows(logits: torch.Tensor, prompt: Sequence[int], k: int) -> list[Optional[LogprobRow]]:
    """Row ``i`` is ``(prompt[i], logprob)`` then the top-``k`` alternatives; ``None`` for ``i == 0``.

    ``logits[i]`` are the logits after prompt position ``i`` (``len(prompt) - 1`` rows).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(prompt[1:], device=logits.device)
    own = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    rows: list[Optional[LogprobRow]] = [None]
    if k == 0:
        return rows + [[(t, lp)] for t, lp in zip(prompt[1:], own)]
    top_lps, top_ids = logprobs.topk(k, dim=-1)
    for token, lp, ids, lps in zip(prompt[1:], own, top_ids.tolist(), top_lps.tolist()):
        rows.append([(token, lp), *zip(ids, lps)])
    return rows
