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


@pytest.mark.parametrize('processed', [False, True])
def test_logprobs_are_computed_only_for_the_rows_that_ask_and_equal_the_whole_batch_ones(monkeypatch, processed):
    from twinkle_async.engines.base import RequestParams
    from twinkle_async.engines.torch.slots import SlotTable

    torch.manual_seed(2)
    batch, vocab = 6, 300
    table = SlotTable(batch, vocab, torch.device('cpu'), seed=0)
    for slot in range(batch):
        table.assign(slot, RequestParams(max_tokens=4, temperature=0.0 if slot % 2 else 0.8, seed=slot), [1, 2],
                     table.seeded(slot), 'base')
    logits = torch.randn(batch, vocab) * 3
    asking = torch.tensor([1, 4])
    widths: list[int] = []
    real_log_softmax = torch.log_softmax
    monkeypatch.setattr(torch, 'log_softmax', lambda x, dim: widths.append(len(x)) or real_log_softmax(x, dim=dim))
    flags = sampling.BatchFlags(any_penalty=False, all_greedy=False, any_top_k_top_p=False, max_logprobs=3,
                                processed_logprobs=processed)
    whole = sampling.sample_tokens(logits, table, slice(0, batch), flags)
    for slot in range(batch):  # the same noise again
        table.generators[slot] = torch.Generator().manual_seed(slot)
    widths.clear()
    part = sampling.sample_tokens(logits, table, slice(0, batch), sampling.BatchFlags(
        any_penalty=False, all_greedy=False, any_top_k_top_p=False, max_logprobs=3, processed_logprobs=processed,
        logprob_rows=asking))
    assert set(widths) == {len(asking)}, 'log-softmax ran over the asking rows only'
    assert torch.equal(part.tokens, whole.tokens)
    for name in ('token_logprobs', 'top_ids', 'top_logprobs'):
        assert torch.equal(getattr(part, name)[asking], getattr(whole, name)[asking]), name
