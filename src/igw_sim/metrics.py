"""vLLM-named Prometheus metrics read from an :class:`~igw_sim.engine.Engine` at scrape time.

Names, types and labels follow vLLM 0.32: every family carries ``engine="0"`` and
``model_name=<first served model>``; ``vllm:cache_config_info`` is an info-style gauge of value 1.0.
Each endpoint gets its own :class:`prometheus_client.CollectorRegistry` (never the global one), so many
simulated endpoints can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from igw_sim.engine import Engine
from igw_sim.stats import Histogram

__all__ = ["EngineCollector", "build_registry"]

_LABELS = ["model_name", "engine"]


class EngineCollector(Collector):
    """Yields the engine's gauges, counters and histograms; cheap (O(running sequences))."""

    def __init__(self, engine: Engine, *, model_name: str) -> None:
        self._engine = engine
        self._labels = [model_name, "0"]
        self._created = time.time()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=_LABELS)
        family.add_metric(self._labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=_LABELS)
        family.add_metric(self._labels, value, created=self._created)
        return family

    def _histogram(self, name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=_LABELS)
        family.add_metric(self._labels, buckets=hist.cumulative(), sum_value=hist.total)
        return family

    def collect(self) -> Iterator[Metric]:
        eng = self._engine
        cfg = eng.config
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", eng.running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", eng.waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"],
        )
        info.add_metric([str(cfg.block_size), str(cfg.kv_blocks), "True", "0"], 1.0)
        yield info
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", eng.prompt_tokens_total)
        yield self._counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", eng.generation_tokens_total
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*_LABELS, "finished_reason"],
        )
        for reason in ("stop", "length", "abort"):
            success.add_metric([*self._labels, reason], eng.success_total.get(reason, 0), created=self._created)
        yield success
        yield self._histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", eng.ttft
        )
        yield self._histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", eng.itl
        )
        yield self._histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", eng.e2e
        )
        yield self._histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            eng.queue_time,
        )


def build_registry(engine: Engine, *, model_name: str) -> CollectorRegistry:
    """A fresh registry holding only the engine's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name=model_name))
    return registry
