"""The engine protocol: what the core asks of every engine, and the records it exchanges with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncGenerator, Literal, Optional, Protocol, runtime_checkable

from pydantic import Field

from twinkle_async.adapters import BASE_MODEL, AdapterSpec
from twinkle_async.data_format.outputs import LogprobRow, StopReason
from twinkle_async.data_format.sampling_params import SamplingParams
from twinkle_async.multimodal.processing import MultiModalPrompt
from twinkle_async.weights import NamedTensors

__all__ = ['RequestParams', 'EngineRequest', 'EngineOutput', 'EngineStats', 'Engine', 'PauseMode', 'PAUSE_MODES',
           'CacheKind', 'CACHE_KINDS', 'LogprobsMode', 'apply_update']

PauseMode = Literal['abort', 'keep', 'wait']
PAUSE_MODES: tuple[str, ...] = ('abort', 'keep', 'wait')
CacheKind = Literal['prefix', 'mm', 'encoder']
CACHE_KINDS: tuple[str, ...] = ('prefix', 'mm', 'encoder')
LogprobsMode = Literal['raw_logprobs', 'processed_logprobs']
"""``engine_args['logprobs_mode']`` on both engines: 'raw_logprobs' (the default, as in vLLM) are the model's own
log-softmax; 'processed_logprobs' are those of the distribution tokens were drawn from (after the repetition
penalty, temperature, top-k and top-p, renormalised; greedy requests: after the penalty). Prompt logprobs are
always raw."""


class RequestParams(SamplingParams):
    """``SamplingParams`` resolved for one request by ``sampler.requests.resolve_params``: ``max_tokens`` is what
    the request may generate within the model's context (scoring is one throw-away greedy token)."""

    max_tokens: int = Field(ge=1)


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One validated prompt to sample ``params.num_samples`` completions from; ``multi_modal`` holds its images
    (``prompt_token_ids`` has their tokens expanded, as the model's processor does). ``session_id`` names the
    conversation it belongs to: an engine of several replicas keeps a session on one (prefix-cache reuse)."""

    request_id: str
    prompt_token_ids: list[int]
    params: RequestParams
    adapter_name: str = BASE_MODEL
    multi_modal: Optional[MultiModalPrompt] = None
    session_id: Optional[str] = None


@dataclass(slots=True)
class EngineOutput:
    """New tokens of one sample (``index``) of a request; ``finish_reason`` ends that sample.

    ``prompt_logprobs`` rows (``(prompt_token, logprob)`` then top-k; ``None`` for position 0) come
    once per request, on its first output. ``weight_version`` is the version that sampled ``token_ids``.
    ``sampling_masks`` (with ``return_sampling_mask``): per token, the sorted ids it could have been drawn from.
    """

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: Optional[list[LogprobRow]]
    text: str
    finish_reason: Optional[StopReason] = None
    prompt_logprobs: Optional[list[Optional[LogprobRow]]] = None
    weight_version: int = 0
    sampling_masks: Optional[list[list[int]]] = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's own counters (requests, not samples, unless said).

    ``used_slots``: samples holding KV memory (torch: cache rows; vLLM: its unfinished requests).
    ``kv_usage``: the share of the KV cache held by running samples, 0..1 (vLLM: its block pool as of
    the engine core's last step).
    ``prefix_cache_queries`` / ``prefix_cache_hits``: prompt tokens looked up in / found in the prefix cache
    since the engine started (0 for an engine without one).
    ``steps``: engine steps (forward passes) that produced outputs since the engine started.
    ``aborted``: requests ended early by an abort (a closed or cancelled stream, ``abort``, ``pause('abort')``,
    ``sleep``) since the engine started.
    ``preemptions``: samples whose KV was freed for others to go on, to be computed again when memory is free,
    since the engine started (vLLM: requests).
    ``waiting``: requests accepted but not admitted yet — held by a pause, or queued (vLLM: only held ones; its
    queued requests count as running).
    """

    waiting: int
    running: int
    used_slots: int
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    steps: int = 0
    aborted: int = 0
    preemptions: int = 0


@runtime_checkable
class Engine(Protocol):
    """Both engines implement this; the core never asks which one it has."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    logprobs_mode: LogprobsMode
    tokenizer: Any

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream outputs of ``request``; closing the iterator aborts the request."""

    async def abort(self, request_id: str) -> None:
        """End a request early: its unfinished samples finish with 'abort'."""

    async def stats(self) -> EngineStats:
        """Counters as of after every earlier call (submissions and aborts) took effect."""

    @property
    def weight_version(self) -> int:
        """The version of the weights new tokens are sampled with (0 until the first update)."""

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters."""

    async def add_adapter(self, spec: AdapterSpec) -> None:
        """Load (or replace) a LoRA adapter; requests naming it use it from now on (the core has aborted
        the requests that used the one it replaces)."""

    async def remove_adapter(self, name: str) -> None:
        """Unload an adapter (the core has aborted the requests still using it)."""

    async def stage_weights(self, weights: NamedTensors, adapter_name: str) -> None:
        """Check every tensor of an update of base (``BASE_MODEL``) or ``adapter_name``'s weights and hold it ready;
        what is served does not change. Replaces an update staged earlier. Raises ``WeightUpdateError`` (nothing
        staged) on a bad tensor."""

    async def commit_weights(self, version: int) -> None:
        """Apply the staged update in place, all at once between two steps, and serve it as ``version``."""

    async def discard_weights(self) -> None:
        """Forget the staged update (a no-op without one)."""

    async def pause(self, mode: PauseMode) -> None:
        """Hold new requests; 'abort' ends, 'keep' freezes, 'wait' drains the ones in flight."""

    async def resume(self) -> None:
        """Undo ``pause``: held requests start, kept ones go on."""

    async def sleep(self, level: int) -> None:
        """Abort what runs and free memory (1: KV cache; 2: also the weights) until ``wake_up``."""

    async def wake_up(self) -> None:
        """Back from ``sleep``; held requests start."""

    async def reset_cache(self, kind: CacheKind) -> None:
        """Empty the engine's ``kind`` cache; a no-op for a cache the engine does not have."""

    async def close(self) -> None:
        """Stop the engine and release its resources; pending requests fail."""


async def apply_update(engine: Engine, weights: NamedTensors, adapter_name: str, version: int) -> None:
    """Stage then commit an update on ``engine`` (a failed stage leaves nothing staged)."""
    await engine.stage_weights(weights, adapter_name)
    await engine.commit_weights(version)
