"""vLLM ``RequestOutput`` -> our ``EngineOutput`` records (sampled token first in every logprob row)."""

from __future__ import annotations

from typing import Any, Optional

from twinkle_async.data_format.outputs import LogprobRow
from twinkle_async.engines.base import EngineOutput, RequestParams

__all__ = ['to_engine_outputs', 'to_vllm_params', 'sampling_masks']


def to_vllm_params(params: RequestParams, n: int) -> Any:
    """vLLM's parameters; with a sampling mask of a sampled request, logprobs of at least its top-k tokens (the mask
    is read from them: see :func:`sampling_masks`)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    fields = params.model_dump(exclude={'num_samples', 'stop', 'return_sampling_mask'})
    if params.return_sampling_mask and params.temperature > 0:
        fields['logprobs'] = max(params.logprobs or 0, params.top_k)
    return SamplingParams(n=n, stop=list(params.stop_strings) or None,
                          stop_token_ids=list(params.stop_token_ids) or None, output_kind=RequestOutputKind.DELTA,
                          **fields)


def sampling_masks(tokens: list[int], entries: list[dict[int, Any]], greedy: bool) -> list[list[int]]:
    """Per token, the ids it could have been drawn from: its top-k processed logprobs that are finite (top-k and
    top-p set the others to -inf; the kept set lies within the top-k), or the token alone when greedy."""
    if greedy:
        return [[token] for token in tokens]
    return [sorted(tid for tid, lp in entry.items() if lp.logprob > float('-inf')) for entry in entries]


def to_engine_outputs(request_id: str, output: Any, params: RequestParams, with_prompt: bool,
                      weight_version: int) -> list[EngineOutput]:
    """One ``EngineOutput`` per completion in ``output`` (a DELTA ``RequestOutput``)."""
    prompt_rows = _prompt_rows(output, params) if with_prompt else None
    results = []
    for completion in output.outputs:
        rows = masks = None
        if params.logprobs is not None:
            rows = [_row(token, entry, params.logprobs)
                    for token, entry in zip(completion.token_ids, completion.logprobs or [])]
        if params.return_sampling_mask:
            masks = sampling_masks(list(completion.token_ids), completion.logprobs or [], params.temperature == 0)
        results.append(EngineOutput(request_id, completion.index, list(completion.token_ids), rows, completion.text,
                                    completion.finish_reason, prompt_rows, weight_version, masks))
        prompt_rows = None
    return results


def _row(token: int, entry: dict[int, Any], k: int) -> LogprobRow:
    top = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k))
    return [(token, entry[token].logprob), *((tid, logprob) for _, tid, logprob in top)]


def _prompt_rows(output: Any, params: RequestParams) -> Optional[list[Optional[LogprobRow]]]:
    if params.prompt_logprobs is None or output.prompt_logprobs is None:
        return None
    prompt = output.prompt_token_ids
    return [None if entry is None else _row(token, entry, params.prompt_logprobs)
            for token, entry in zip(prompt, output.prompt_logprobs)]
