"""The torch engine's top-k/top-p masking against a float64 hand computation: the same kept tokens per row
(mixed settings in one batch), without sorting the vocabulary unless a nucleus is larger than the candidates."""

from __future__ import annotations

import pytest
import torch

from twinkle_async.engines.torch import sampling


def hand_kept(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Per row: the top_k largest, renormalised in float64, then the smallest prefix whose mass reaches top_p
    (top_p=1: all of them)."""
    kept = torch.zeros_like(logits, dtype=torch.bool)
    for row, (k, p) in enumerate(zip(top_k, top_p)):
        order = logits[row].double().argsort(descending=True)[:k]
        probs = logits[row].double()[order].softmax(dim=0)
        before = probs.cumsum(dim=0) - probs
        kept[row, order[(before < p) | (torch.arange(len(order)) == 0) | (p >= 1)]] = True
    return kept


def rows(batch: int, vocab: int) -> tuple[list[int], list[float]]:
    top_k = [[vocab, 1, 5, 50, vocab, 300][i % 6] for i in range(batch)]
    top_p = [[0.9, 1.0, 0.5, 0.95, 1.0, 1e-6, 0.7][i % 7] for i in range(batch)]
    return top_k, top_p


def test_peaked_rows_keep_what_the_hand_computation_keeps_without_a_sort(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(42, 5000) * 6
    top_k, top_p = rows(42, 5000)

    def no_sort(*args):
        raise AssertionError('the vocabulary was sorted')
    monkeypatch.setattr(sampling, '_sorted_top_k_top_p', no_sort)
    masked = sampling._apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    assert torch.equal(~masked.isinf(), hand_kept(logits, top_k, top_p))
    assert torch.equal(masked[~masked.isinf()], logits[~masked.isinf()]), 'kept logits are unchanged'


@pytest.mark.parametrize('scale', [0.05, 6.0])
def test_a_nucleus_beyond_the_candidates_falls_back_to_the_sort_and_agrees(scale):
    torch.manual_seed(1)
    logits = torch.randn(12, 5000) * scale  # 0.05: nearly flat, a 0.9 nucleus holds ~4,500 tokens
    top_k, top_p = [5000] * 12, [0.9] * 12
    masked = sampling._apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    expected = hand_kept(logits, top_k, top_p)
    assert torch.equal(~masked.isinf(), expected)
    assert (expected.sum(dim=1) > sampling._NUCLEUS_CANDIDATES).all() == (scale < 1)
