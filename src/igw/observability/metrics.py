"""The EPP's Prometheus metrics, registered on an injected registry (never the global one).

Names follow the reference EPP (``inference_objective_*``, ``inference_pool_*``,
``inference_extension_*``) so existing dashboards work; igw's own additions are ``igw_*``.
Model names come from requests, so their label values pass through :class:`LabelGuard`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, ParamSpec, Protocol, TypeVar, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from igw.api.types import EndpointState
from igw.framework.plugin import Plugin

PluginT = TypeVar("PluginT", bound=Plugin)
A = ParamSpec("A")
R = TypeVar("R")
_plugin_log = logging.getLogger("igw.plugins")

_LATENCY_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1,
    1.5,
    2,
    3,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    3600,
)
_FAST_BUCKETS = (
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip
_SIZE_BUCKETS = tuple(float(2**i) for i in range(6, 31, 2))


class LabelGuard:
    """Lets through at most ``limit`` distinct label values; later ones become ``other``."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return "other"


class PluginMetrics:
    """Latency and failures per plugin and extension point (Filter, Scorer, Picker, PreRequest...)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "inference_extension_plugin_duration_seconds", "Time spent in a plugin, per extension point.",
            ["extension_point", "plugin_type", "plugin_name"], buckets=_FAST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "igw_plugin_errors", "Plugin calls that raised (handled by the failure policy of the hook).",
            ["extension_point", "plugin_type", "plugin_name"], registry=registry,
        )  # fmt: skip


class TimedPlugin(Generic[PluginT]):
    """A plugin with its latency histogram and error counter resolved once, for one extension point."""

    __slots__ = ("errors", "extension_point", "observe", "plugin")

    def __init__(self, plugin: PluginT, extension_point: str, metrics: PluginMetrics | None) -> None:
        self.plugin = plugin
        self.extension_point = extension_point
        if metrics is None:
            self.observe: Callable[[float], None] = _ignore
            self.errors: Callable[[], None] = _nothing
        else:
            self.observe = metrics.duration.labels(extension_point, plugin.type_name, plugin.name).observe
            self.errors = metrics.errors.labels(extension_point, plugin.type_name, plugin.name).inc

    def guarded(self, fn: Callable[A, R], *args: A.args, **kwargs: A.kwargs) -> R | None:
        """Call a hook of the plugin, timed; if it raises, log and count it and return ``None``
        (the failure policy of hooks: the request goes on without what the hook would add)."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception:
            _plugin_log.exception(
                "%s hook of plugin %s failed; continuing without it", self.extension_point, self.plugin.name
            )
            self.errors()
            return None
        finally:
            self.observe(time.perf_counter() - t0)


def _ignore(_: float) -> None:
    pass


def _nothing() -> None:
    pass


@runtime_checkable
class PrefixIndexStats(Protocol):
    """What a prefix-cache index plugin reports (the approximate producer does)."""

    on_match: Callable[[int, int], None] | None
    """Set by the EPP: called with (matched bytes, prompt bytes) for every routed request."""

    @property
    def indexer_size(self) -> int: ...


class PrefixIndexMetrics:
    """The reference's prefix-indexer metrics, fed by every index plugin of the configuration."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._indexes: list[PrefixIndexStats] = []
        self.size = Gauge(
            "inference_extension_prefix_indexer_size", "Blocks held by the prefix-cache index.", registry=registry
        )
        self.size.set_function(lambda: float(sum(i.indexer_size for i in self._indexes)))
        self.hit_ratio = Histogram(
            "inference_extension_prefix_indexer_hit_ratio", "Share of a prompt found in the chosen endpoint's cache.",
            buckets=[i / 10 for i in range(11)], registry=registry,
        )  # fmt: skip
        self.hit_bytes = Histogram(
            "inference_extension_prefix_indexer_hit_bytes", "Prompt bytes found in the chosen endpoint's cache.",
            buckets=_SIZE_BUCKETS, registry=registry,
        )  # fmt: skip

    def watch(self, index: PrefixIndexStats) -> None:
        self._indexes.append(index)
        index.on_match = self._observe

    def _observe(self, matched_bytes: int, total_bytes: int) -> None:
        self.hit_bytes.observe(matched_bytes)
        if total_bytes:
            self.hit_ratio.observe(matched_bytes / total_bytes)


class EppMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_label = LabelGuard()
        r = registry
        self.requests = Counter(
            "inference_objective_request", "Requests scheduled to an endpoint.",
            ["model_name", "target_model_name", "priority"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "inference_objective_request_error", "Requests that ended with an error.",
            ["model_name", "target_model_name", "error_code"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "inference_objective_request_duration_seconds", "From request headers to the end of the stream.",
            ["model_name", "target_model_name"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_sizes = Histogram(
            "inference_objective_request_sizes", "Request body size in bytes.",
            ["model_name", "target_model_name"], buckets=_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.running = Gauge("inference_objective_running_requests", "Requests in flight.", ["model_name"], registry=r)
        self.scheduler_duration = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds", "Time spent picking an endpoint.",
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.scheduler_attempts = Counter(
            "inference_extension_scheduler_attempts",
            "Scheduling attempts by outcome.",
            ["status"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "igw_request_stage_duration_seconds", "Time spent in each stage of the request path.",
            ["stage"], buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "igw_response_header_latency_seconds", "From request headers to the model server's response headers.",
            ["model_name"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.streams = Gauge("igw_extproc_streams_active", "Open ext_proc streams.", registry=r)
        self.ended_before_response = Counter(
            "igw_requests_ended_before_response",
            "Routed requests whose ext_proc stream ended before the response headers "
            "(client aborts; or a proxy that does not send the response to the EPP in duplex mode).",
            registry=r,
        )
        self.rewrite_decisions = Counter(
            "inference_extension_model_rewrite_decisions", "Requests whose model was rewritten, per rule.",
            ["model_rewrite_name", "model_name", "target_model"], registry=r,
        )  # fmt: skip
        self.plugins = PluginMetrics(r)
        self.prefix = PrefixIndexMetrics(r)
        self.protocol_errors = Counter(
            "igw_extproc_protocol_errors", "ext_proc streams that broke the protocol.", registry=r
        )

    def watch_pool(self, pool_name: str, endpoints: Callable[[], Sequence[EndpointState]]) -> None:
        """Expose pool-level gauges computed from the live store at scrape time."""
        self.registry.register(_PoolCollector(pool_name, endpoints))


class _PoolCollector(Collector):
    def __init__(self, pool_name: str, endpoints: Callable[[], Sequence[EndpointState]]) -> None:
        self._name = pool_name
        self._endpoints = endpoints

    def collect(self) -> Iterable[Metric]:
        states = self._endpoints()
        n = len(states)
        ready = GaugeMetricFamily("inference_pool_ready_pods", "Endpoints in the pool.", labels=["name"])
        ready.add_metric([self._name], n)
        kv = GaugeMetricFamily("inference_pool_average_kv_cache_utilization", "Mean KV use.", labels=["name"])
        kv.add_metric([self._name], sum(s.metrics.kv_usage for s in states) / n if n else 0.0)
        queue = GaugeMetricFamily("inference_pool_average_queue_size", "Mean waiting queue.", labels=["name"])
        queue.add_metric([self._name], sum(s.metrics.waiting for s in states) / n if n else 0.0)
        per = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Waiting queue per endpoint.",
            labels=["name", "model_server_pod"],
        )
        inflight = GaugeMetricFamily(
            "igw_endpoint_inflight_requests", "Requests in flight per endpoint.", labels=["name", "endpoint"]
        )
        for s in states:
            per.add_metric([self._name, s.address], s.metrics.waiting)
            inflight.add_metric([self._name, s.address], s.inflight)
        return [ready, kv, queue, per, inflight]
