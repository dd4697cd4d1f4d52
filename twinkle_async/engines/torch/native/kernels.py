"""CPU kernels of the native runner, compiled on first use (``csrc/``; a C++ compiler is needed, else the runner
keeps using ATen ops and SDPA and logs why).

``decode_attention`` reads each row's own cached length from its blocks of the paged cache in place (no gather, no
padding to the longest row, no mask) with the grouped query heads sharing each K/V row as it is loaded; for
bfloat16 with head size 64 or 128 on CPUs with AVX-512 BF16 it runs vectorised bf16 dot products
(``benchmarks/bench_decode_attention.py`` compares it with SDPA). ``prefill_attention`` does the same for prompt
rows (whole prompts and chunks after cached positions, causally; bfloat16 on AVX-512 BF16, see
``has_prefill_attention``). ``rms_norm`` (with the residual add), ``rotary_``, ``silu_mul`` and ``write_rows_`` (K/V
rows into their blocks) each replace several ATen ops of a layer for half-precision models
(:class:`~twinkle_async.engines.torch.native.ops.FusedOps`); ``argmax`` picks greedy tokens in one pass. The build
is cached by torch (``TORCH_EXTENSIONS_DIR``), once per kind of CPU (it is compiled for the CPU it runs on), in
~30-60 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any, Optional

__all__ = ['cpu_kernels']

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / 'csrc' / name
            for name in ('bindings.cpp', 'decode_attention.cpp', 'prefill_attention.cpp', 'fused_ops.cpp')]
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-ffast-math', '-fno-finite-math-only']
_lock = threading.Lock()
_built: dict[str, Any] = {}


def cpu_kernels() -> Optional[Any]:
    """The compiled module (``decode_attention(q [B, H, D], keys, values [num_blocks, H_kv, block_size, D], tables
    [>= B, W] int64, lengths [B] int64, scale, threads) -> [B, H, D]`` and the fused element-wise ops, see
    ``csrc/``), or ``None`` where it cannot be built (or ``TWINKLE_ASYNC_NO_KERNELS=1``)."""
    if os.environ.get('TWINKLE_ASYNC_NO_KERNELS') == '1':
        return None
    with _lock:
        if 'module' not in _built:
            _built['module'] = _build()
        return _built['module']


def _build() -> Optional[Any]:
    from torch.utils.cpp_extension import load

    try:
        return load(f'twinkle_async_cpu_kernels_{_cpu_kind()}', [str(path) for path in _SOURCES], extra_cflags=_FLAGS,
                    extra_ldflags=['-fopenmp'], verbose=False)
    except Exception as exc:  # no compiler, headers or OpenMP: the runner keeps SDPA
        logger.warning('torch engine: the CPU kernels could not be built (%s); using ATen ops and SDPA', exc)
        return None


def _cpu_kind() -> str:
    """A short hash of the CPU's model and instruction-set flags: a build for one CPU never runs on another."""
    try:
        described = Path('/proc/cpuinfo').read_text().split('\n\n')[0]
    except OSError:
        described = platform.processor() + platform.machine()
    keep = '\n'.join(line for line in described.splitlines() if line.startswith(('model name', 'flags')))
    return hashlib.sha256(keep.encode()).hexdigest()[:12]
