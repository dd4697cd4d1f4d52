"""Turn sampled tokens into ``EngineOutput`` records: logprob rows, text deltas, stop checks."""

from __future__ import annotations

from typing import Optional

from twinkle_async.data_format.outputs import LogprobRow
from twinkle_async.engines.base import EngineOutput
from twinkle_async.engines.torch.sampling import SampledBatch
from twinkle_async.engines.torch.sequence import Sample

__all__ = ['OutputProcessor']


class OutputProcessor:
    """Applies one sampled batch to its samples (in row order) and says which finished and why."""

    def __init__(self, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def process(self, samples: list[Sample], batch: SampledBatch, weight_version: int) -> list[EngineOutput]:
        tokens = batch.tokens.tolist()
        rows = _logprob_rows(tokens, batch)
        masks = batch.masks or {}
        return [self._advance(sample, token, row, weight_version, masks.get(i))
                for i, (sample, token, row) in enumerate(zip(samples, tokens, rows))]

    def _advance(self, sample: Sample, token: int, row: Optional[LogprobRow], weight_version: int,
                 mask: Optional[list[int]]) -> EngineOutput:
        params = sample.params
        sample.output_ids.append(token)
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            if params.include_stop_str_in_output:
                sample.text += sample.detokenizer.step(token)
            sample.finish_reason = 'stop'
        else:
            previous = len(sample.text)
            sample.text += sample.detokenizer.step(token)
            if params.stop_strings and _truncate_at_stop(sample, previous):
                sample.finish_reason = 'stop'
        if sample.finish_reason is None and self._at_length(sample):
            sample.finish_reason = 'length'
        keep = params.logprobs
        return EngineOutput(
            sample.request.request_id, sample.index, [token],
            None if keep is None or row is None else [row[:keep + 1]], _text_delta(sample), sample.finish_reason,
            sample.request.prompt_logprobs if sample.index == 0 and len(sample.output_ids) == 1 else None,
            weight_version, None if mask is None else [mask])

    def _at_length(self, sample: Sample) -> bool:
        generated = len(sample.output_ids)
        total = len(sample.request.prompt_token_ids) + generated
        return generated >= sample.params.max_tokens or total >= self.max_model_len


def _truncate_at_stop(sample: Sample, previous: int) -> bool:
    params, text = sample.params, sample.text
    found: Optional[tuple[int, str]] = None
    for stop in params.stop_strings:
        at = text.find(stop, max(0, previous - len(stop) + 1))
        if at >= 0 and (found is None or at < found[0]):
            found = (at, stop)
    if found is None:
        return False
    at, stop = found
    sample.text = text[:at + len(stop)] if params.include_stop_str_in_output else text[:at]
    return True


def _text_delta(sample: Sample) -> str:
    """New text, holding back a possible stop-string prefix until it is known not to be one."""
    end = len(sample.text)
    params = sample.params
    if sample.finish_reason is None and params.stop_strings and not params.include_stop_str_in_output:
        end -= max(len(s) for s in params.stop_strings) - 1
    if end <= sample.emitted_chars:
        return ''
    delta = sample.text[sample.emitted_chars:end]
    sample.emitted_chars = end
    return delta


def _logprob_rows(tokens: list[int], batch: SampledBatch) -> list[Optional[LogprobRow]]:
    if batch.token_logprobs is None:
        return [None] * len(tokens)
    sampled = batch.token_logprobs.tolist()
    if batch.top_ids is None or batch.top_logprobs is None:
        return [[(t, lp)] for t, lp in zip(tokens, sampled)]
    top_ids, top_lps = batch.top_ids.tolist(), batch.top_logprobs.tolist()
    return [[(t, lp), *zip(ids, lps)] for t, lp, ids, lps in zip(tokens, sampled, top_ids, top_lps)]
