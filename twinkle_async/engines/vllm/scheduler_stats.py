"""The engine core's scheduler counters as of its last step, caught by a vLLM stat logger.

vLLM's scheduler (KV block pool included) lives in the engine-core process; each step it sends
``SchedulerStats`` with its outputs, and ``AsyncLLM`` hands them to every stat logger it was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ['SchedulerSnapshot', 'snapshot_logger_factory']


@dataclass
class SchedulerSnapshot:
    """The last step's scheduler counters (all zero before the first step); prefix-cache counts are totals."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up since start (summed over steps)
    prefix_cache_hits: int = 0
    steps: int = 0  # steps whose outputs reached this process
    preemptions: int = 0  # requests preempted since start (summed over steps)


def snapshot_logger_factory(snapshot: SchedulerSnapshot) -> Any:
    """A ``StatLoggerFactory`` for ``AsyncLLM(stat_loggers=[...])`` that keeps ``snapshot`` current."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if iteration_stats is not None:  # vLLM makes one for each step with outputs
                snapshot.steps += 1
                snapshot.preemptions += iteration_stats.num_preempted_reqs
            if scheduler_stats is not None:
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs
                snapshot.kv_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                snapshot.prefix_cache_queries += prefix.queries
                snapshot.prefix_cache_hits += prefix.hits

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotLogger
