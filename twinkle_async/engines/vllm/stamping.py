"""Per-request collectors that remember which weight version produced each vLLM output.

vLLM's engine core labels every step's outputs with the weight version set by
``update_weight_version``; its output handler passes the label to ``process_outputs`` and then puts
each request's ``RequestOutput`` in that request's queue. ``VersionLabels`` records the label of the
outputs being processed, and ``stamped_collector`` (put in place of vLLM's per-request queue) stores it
with each output, without merging outputs of different versions.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twinkle_async.engines.collector import OutputCollector

__all__ = ['VersionLabels', 'stamped_collector']


class VersionLabels:
    """The weight version of the outputs vLLM's output handler is processing now."""

    def __init__(self, output_processor: Any) -> None:
        self.current = 0
        process_outputs = output_processor.process_outputs

        def labelled(*args: Any, weight_version: Optional[str] = None, **kwargs: Any) -> Any:
            self.current = _parse(weight_version, self.current)
            return process_outputs(*args, weight_version=weight_version, **kwargs)

        output_processor.process_outputs = labelled


def stamped_collector(vllm_queue: Any, labels: VersionLabels,
                      on_abort: Callable[[], object]) -> OutputCollector[tuple[int, Any]]:
    """Takes over one request's vLLM queue: its outputs go to the returned collector as ``(version, output)``
    pairs. ``on_abort`` runs once if vLLM ends the request with 'abort' (vLLM puts that output even after the
    consumer has left)."""
    collector: OutputCollector[tuple[int, Any]] = OutputCollector()
    aborted = False

    def put(output: Any) -> None:
        nonlocal aborted
        if isinstance(output, BaseException):
            collector.fail(output)
            return
        collector.put((labels.current, output))
        if not aborted and any(c.finish_reason == 'abort' for c in output.outputs):
            aborted = True
            on_abort()

    pending = vllm_queue.output  # put before we took over (rare): same step, same label
    vllm_queue.put = put
    if pending is not None:
        vllm_queue.output = None
        put(pending)
    return collector


def _parse(label: Optional[str], default: int) -> int:
    try:
        return int(label) if label is not None else default
    except ValueError:
        return 0
