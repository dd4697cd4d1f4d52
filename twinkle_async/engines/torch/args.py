"""``engine_args`` of the torch engine, validated (an unknown key is an error naming it)."""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from twinkle_async.data_format.validation import describe_validation_error
from twinkle_async.engines.base import LogprobsMode
from twinkle_async.errors import EngineArgsError

__all__ = ['TorchEngineArgs', 'parse_engine_args']

logger = logging.getLogger(__name__)


class TorchEngineArgs(BaseModel):
    """Options of the native PyTorch engine.

    ``dtype``, ``max_model_len``, ``max_num_seqs`` and ``seed`` mean the same as on the vLLM engine.
    ``max_num_seqs`` counts samples (KV slots), ``max_num_batched_tokens`` bounds the tokens of one step (decode rows
    and prefill). ``kv_cache_memory_bytes`` bounds the KV cache: the native runner's paged pool of ``block_size``-
    position blocks (requests wait until it can hold them to their ``max_tokens``; the samples of a request share
    their prompt's blocks, and prompts share cached prefixes), or the HF runner's slot cache, which must hold
    ``max_num_seqs * max_model_len`` positions.
    ``logprobs_mode`` and ``max_logprobs`` mean what they mean in vLLM (see ``engines.base.LogprobsMode``);
    ``torch_dtype`` is another name for ``dtype``. ``runner``: ``'native'`` runs the Llama family (Llama, Mistral,
    Qwen2, Qwen3) on the engine's own fused model, ``'hf'`` any causal LM through its Hugging Face modules, ``'auto'``
    the native runner where it serves the checkpoint. ``gpu_memory_utilization`` (vLLM's, passed by Twinkle scripts) is
    accepted and ignored: ``kv_cache_memory_bytes`` sizes this engine's cache. ``limit_mm_per_prompt`` (vLLM's):
    at most ``{'image': n}`` images in one prompt (vision-language models; no limit by default).
    """

    model_config = ConfigDict(extra='forbid', frozen=True)

    dtype: Literal['float32', 'bfloat16', 'float16', 'auto'] = Field(
        default='float32', validation_alias=AliasChoices('dtype', 'torch_dtype'))
    max_model_len: Optional[int] = Field(default=None, ge=2)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=4096, ge=1)
    seed: int = 0
    device: str = 'auto'
    kv_cache_memory_bytes: int = Field(default=4 * 2**30, ge=1)
    block_size: int = Field(default=16, ge=1, le=1024)
    trust_remote_code: bool = False
    attn_implementation: Literal['twinkle', 'sdpa', 'eager'] = 'twinkle'
    runner: Literal['auto', 'native', 'hf'] = 'auto'
    num_threads: Optional[int] = Field(default=None, ge=1)
    logprobs_mode: LogprobsMode = 'raw_logprobs'
    max_logprobs: int = Field(default=20, ge=0)
    gpu_memory_utilization: Optional[float] = Field(default=None, gt=0, le=1)
    limit_mm_per_prompt: Optional[dict[Literal['image'], int]] = None


def parse_engine_args(engine_args: Optional[Mapping[str, Any]]) -> TorchEngineArgs:
    """Validate a user's ``engine_args`` dict.

    Raises:
        EngineArgsError: an unknown key or a bad value, named in the message.
    """
    user = dict(engine_args or {})
    if 'dtype' in user and 'torch_dtype' in user:
        raise EngineArgsError('engine_args: give dtype or torch_dtype (the same option), not both')
    try:
        args = TorchEngineArgs(**user)
    except ValidationError as exc:
        raise EngineArgsError(describe_validation_error(exc, 'engine_args',
                                                        'unknown engine_args key for the torch engine')) from None
    if args.gpu_memory_utilization is not None:
        logger.warning('torch engine: gpu_memory_utilization=%s ignored (kv_cache_memory_bytes=%d sizes the KV cache)',
                       args.gpu_memory_utilization, args.kv_cache_memory_bytes)
    return args
