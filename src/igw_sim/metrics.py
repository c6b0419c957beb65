"""Prometheus metrics read from an :class:`~igw_sim.engine.Engine` at scrape time.

Two naming styles:

``vllm`` (default)
    Names, types and labels of vLLM 0.32: every engine family carries ``engine="0"`` and
    ``model_name=<first served model>``; ``vllm:cache_config_info`` is an info-style gauge of value 1.0
    whose labels describe the cache; ``vllm:lora_requests_info`` (only with LoRA enabled) keeps one
    series per distinct ``(max_lora, running_lora_adapters, waiting_lora_adapters)`` label set, valued
    with the Unix time of its last update, so a reader takes the series with the largest value.
    ``vllm:num_requests_waiting_by_reason`` splits the waiting count into ``reason="capacity"`` and
    ``reason="deferred"`` (always 0 here). Latency histograms are in simulated seconds.
``sglang``
    The SGLang names routers read: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
    ``sglang:token_usage``, ``sglang:cache_config_info{page_size,num_pages}`` and a few counters and
    histograms, labelled ``model_name``.

Each endpoint gets its own :class:`prometheus_client.CollectorRegistry` (never the global one), so many
simulated endpoints can live in one process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Literal

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

__all__ = ["MAX_LORA_SERIES", "EngineCollector", "MetricsStyle", "build_registry"]

MetricsStyle = Literal["vllm", "sglang"]

MAX_LORA_SERIES = 64
"""``vllm:lora_requests_info`` label sets remembered (oldest dropped first)."""


ROUTING_FAMILIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:lora_requests_info",
    "vllm:num_preemptions",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
)
"""The vLLM metric families gateways and routers read (or that describe what they do): the simulator
exports them with vLLM 0.32's types, labels and buckets (checked against a real engine)."""


class EngineCollector(Collector):
    """Yields the engine's gauges, counters and histograms; cheap (O(running + waiting requests))."""

    def __init__(self, engine: Engine, *, model_name: str, style: MetricsStyle = "vllm") -> None:
        self._engine = engine
        self._style = style
        self._model = model_name
        self._names = ["model_name", "engine"] if style == "vllm" else ["model_name"]
        self._labels = [model_name, "0"] if style == "vllm" else [model_name]
        self._created = time.time()
        self._lora_series: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=self._names)
        family.add_metric(self._labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=self._names)
        family.add_metric(self._labels, value, created=self._created)
        return family

    def _histogram(self, name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=self._names)
        family.add_metric(self._labels, buckets=hist.cumulative(), sum_value=hist.total)
        return family

    def collect(self) -> Iterator[Metric]:
        if self._style == "sglang":
            yield from self._collect_sglang()
        else:
            yield from self._collect_vllm()

    def _collect_vllm(self) -> Iterator[Metric]:
        eng = self._engine
        cfg = eng.config
        stats = eng.stats
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.", eng.running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", eng.waiting)
        # vLLM 0.32 splits the waiting count by reason; the simulator defers nobody across steps (a LoRA
        # request skipped for the max_loras rule is back in the queue when the step ends), so every
        # waiting request waits for capacity.
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            labels=[*self._names, "reason"],
        )
        by_reason.add_metric([*self._labels, "capacity"], eng.waiting)
        by_reason.add_metric([*self._labels, "deferred"], 0)
        yield by_reason
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", eng.kv_usage)
        tokens = cfg.kv_blocks * cfg.block_size
        config_labels = {
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "engine": "0",
            "gpu_memory_utilization": "0.9",
            "kv_cache_max_concurrency": str(tokens / cfg.max_model_len),
            "kv_cache_size_tokens": str(tokens),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.kv_blocks),
            "num_gpu_blocks_override": str(cfg.kv_blocks),
            "prefix_caching_hash_algo": "sha256" if cfg.hash_algo == "fast" else cfg.hash_algo,
        }
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(config_labels)
        )
        info.add_metric(list(config_labels.values()), 1.0)
        yield info
        if cfg.lora_enabled:
            yield self._lora_info()
        yield self._counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries_total,
        )
        yield self._counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits_total,
        )
        yield self._counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", stats.preemptions_total
        )
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens_total)
        yield self._counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens_total
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*self._names, "finished_reason"],
        )
        # Like vLLM 0.32, a client disconnect is not counted as finished_reason="abort".
        for reason in ("stop", "length", "abort"):
            success.add_metric([*self._labels, reason], stats.success_total.get(reason, 0), created=self._created)
        yield success
        yield self._histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft
        )
        yield self._histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", stats.itl
        )
        yield self._histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", stats.e2e
        )
        yield self._histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            stats.queue_time,
        )
        yield self._histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            stats.prefill_time,
        )

    def _lora_info(self) -> GaugeMetricFamily:
        running, waiting = self._engine.core.lora_sets()
        key = (str(self._engine.config.max_loras), ",".join(running), ",".join(waiting))
        self._lora_series[key] = time.time()
        self._lora_series.move_to_end(key)
        while len(self._lora_series) > MAX_LORA_SERIES:
            self._lora_series.popitem(last=False)
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        for labels, stamp in self._lora_series.items():
            family.add_metric(list(labels), stamp)
        return family

    def _collect_sglang(self) -> Iterator[Metric]:
        eng = self._engine
        cfg = eng.config
        stats = eng.stats
        yield self._gauge("sglang:num_running_reqs", "The number of running requests.", eng.running)
        yield self._gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", eng.waiting)
        yield self._gauge("sglang:token_usage", "The token usage.", eng.kv_usage)
        used = round(eng.kv_usage * (cfg.kv_blocks - 1)) * cfg.block_size
        yield self._gauge("sglang:num_used_tokens", "The number of used tokens.", used)
        queries = stats.prefix_cache_queries_total
        rate = stats.prefix_cache_hits_total / queries if queries else 0.0
        yield self._gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", rate)
        info = GaugeMetricFamily(
            "sglang:cache_config_info", "Information of the cache config.", labels=["page_size", "num_pages"]
        )
        info.add_metric([str(cfg.block_size), str(cfg.kv_blocks)], 1.0)
        yield info
        yield self._counter("sglang:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens_total)
        yield self._counter(
            "sglang:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens_total
        )
        yield self._counter(
            "sglang:num_requests", "The number of processed requests.", sum(stats.success_total.values())
        )
        yield self._histogram(
            "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft
        )
        yield self._histogram(
            "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", stats.itl
        )
        yield self._histogram(
            "sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", stats.e2e
        )


def build_registry(engine: Engine, *, model_name: str, style: MetricsStyle = "vllm") -> CollectorRegistry:
    """A fresh registry holding only the engine's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name=model_name, style=style))
    return registry
