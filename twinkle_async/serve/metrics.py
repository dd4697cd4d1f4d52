"""Prometheus metrics of one gateway (its own registry): requests, tokens, in flight, latency, KV usage, weights."""

from __future__ import annotations

import time
from typing import Any

from twinkle_async.errors import TwinkleAsyncError

__all__ = ['GatewayMetrics']

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class GatewayMetrics:
    """Counters the routes update; ``render()`` is the ``/metrics`` text (engine gauges read at scrape time)."""

    def __init__(self, sampler: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.sampler = sampler
        self.registry = CollectorRegistry()
        prefix = 'twinkle_async_'
        self.requests = Counter(prefix + 'requests', 'HTTP requests answered', ['endpoint', 'status'],
                                registry=self.registry)
        self.prompt_tokens = Counter(prefix + 'prompt_tokens', 'prompt tokens sent to the engine',
                                     registry=self.registry)
        self.completion_tokens = Counter(prefix + 'completion_tokens', 'tokens generated', registry=self.registry)
        self.in_flight = Gauge(prefix + 'requests_in_flight', 'requests being answered', registry=self.registry)
        self.latency = Histogram(prefix + 'request_latency_seconds', 'time to the whole answer', ['endpoint'],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.kv_usage = Gauge(prefix + 'kv_cache_usage', 'share of the KV cache in use (0..1)', registry=self.registry)
        self.weight_version = Gauge(prefix + 'weight_version', 'version of the weights served', registry=self.registry)
        self.rollouts = Gauge(prefix + 'rollouts', "the sampler's rollout counters (AsyncSampler.metrics())",
                              ['counter'], registry=self.registry)
        self.versions_in_flight = Gauge(prefix + 'requests_by_oldest_token_version',
                                        'requests in flight by the oldest weight version among their tokens',
                                        ['version'], registry=self.registry)

    def started(self) -> float:
        self.in_flight.inc()
        return time.perf_counter()

    def finished(self, endpoint: str, status: int, began: float) -> None:
        self.in_flight.dec()
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - began)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    async def render(self) -> bytes:
        from prometheus_client import generate_latest

        self.weight_version.set(self.sampler.weight_version)
        counters = self.sampler.metrics()
        self.versions_in_flight.clear()
        for version, requests in counters.pop('versions_in_flight').items():
            self.versions_in_flight.labels(str(version)).set(requests)
        for name, value in counters.items():
            self.rollouts.labels(name).set(value)
        try:
            self.kv_usage.set((await self.sampler.engine.stats()).kv_usage)
        except TwinkleAsyncError:  # Ray replicas have no local engine; a dead engine has no usage to report
            pass
        return bytes(generate_latest(self.registry))
