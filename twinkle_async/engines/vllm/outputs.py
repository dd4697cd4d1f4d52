"""vLLM ``RequestOutput`` -> our ``EngineOutput`` records (sampled token first in every logprob row)."""

from __future__ import annotations

from typing import Any, Optional

from twinkle_async.data_format.outputs import LogprobRow
from twinkle_async.engines.base import EngineOutput, RequestParams

__all__ = ['to_engine_outputs', 'to_vllm_params']


def to_vllm_params(params: RequestParams, n: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=n, stop=list(params.stop_strings) or None,
                          stop_token_ids=list(params.stop_token_ids) or None, output_kind=RequestOutputKind.DELTA,
                          **params.model_dump(exclude={'num_samples', 'stop'}))


def to_engine_outputs(request_id: str, output: Any, params: RequestParams, with_prompt: bool,
                      weight_version: int) -> list[EngineOutput]:
    """One ``EngineOutput`` per completion in ``output`` (a DELTA ``RequestOutput``)."""
    prompt_rows = _prompt_rows(output, params) if with_prompt else None
    results = []
    for completion in output.outputs:
        rows = None
        if params.logprobs is not None:
            rows = [_row(token, entry, params.logprobs)
                    for token, entry in zip(completion.token_ids, completion.logprobs or [])]
        results.append(EngineOutput(request_id, completion.index, list(completion.token_ids), rows, completion.text,
                                    completion.finish_reason, prompt_rows, weight_version))
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
