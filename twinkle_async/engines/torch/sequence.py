"""One request and its samples, as the engine thread tracks them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from twinkle_async.adapters import BASE_MODEL
from twinkle_async.data_format.outputs import LogprobRow, StopReason
from twinkle_async.engines.base import EngineRequest, RequestParams
from twinkle_async.template import IncrementalDetokenizer

__all__ = ['Request', 'Sample']


@dataclass(eq=False, slots=True)
class Sample:
    """One of a request's ``num_samples`` completions; lives in KV slot ``slot`` while running (``-1`` while waiting
    or preempted). ``generator``: its seeded random generator, kept across preemptions."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    text: str = ''
    emitted_chars: int = 0
    finish_reason: Optional[StopReason] = None
    generator: Any = None

    @property
    def params(self) -> RequestParams:
        return self.request.params

    @property
    def num_cached(self) -> int:
        """Tokens in the KV cache: the prompt plus every output token but the newest."""
        return len(self.request.prompt_token_ids) + max(len(self.output_ids) - 1, 0)

    @property
    def context(self) -> list[int]:
        """The tokens whose KV it holds: the prompt and every output token but the newest."""
        return self.request.prompt_token_ids + self.output_ids[:-1]

    @property
    def priority(self) -> tuple[int, int]:
        """Earlier requests first, then lower sample indices: the last is preempted first."""
        return self.request.arrival, self.index

    @property
    def seed(self) -> Optional[int]:
        seed = self.request.params.seed
        return None if seed is None else seed + self.index


@dataclass(eq=False, slots=True)
class Request:
    """A request waiting for slots or running; finished when every sample has a finish reason. ``pixels``: the
    image processor's tensors for its images (the model's forward takes them with the prompt)."""

    request_id: str
    prompt_token_ids: list[int]
    params: RequestParams
    adapter: str = BASE_MODEL
    samples: list[Sample] = field(default_factory=list)
    prompt_logprobs: Optional[list[Optional[LogprobRow]]] = None  # filled chunk by chunk while prefilled
    num_prefilled: int = 0  # prompt tokens cached so far (in the staging slot while prefilled in chunks)
    pixels: Optional[Mapping[str, Any]] = None
    arrival: int = 0  # the scheduler's count of requests added before it

    @classmethod
    def from_engine_request(cls, request: EngineRequest, tokenizer: object,
                            pixels: Optional[Mapping[str, Any]] = None) -> Request:
        state = cls(request.request_id, list(request.prompt_token_ids), request.params, request.adapter_name,
                    pixels=pixels)
        state.samples = [Sample(state, i, IncrementalDetokenizer(tokenizer, state.prompt_token_ids))
                         for i in range(request.params.num_samples)]
        return state

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)
