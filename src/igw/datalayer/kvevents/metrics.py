"""The KV-event lane's Prometheus metrics (``igw_kv_events_*``), registered on an injected registry.

They live here rather than in :mod:`igw.observability.metrics` because the data layer and observability
are independent layers; the composition creates :class:`KVEventMetrics` on the EPP's registry and hands
it to the subscriber. Labels are enums only (event type, replay outcome), never endpoints or models.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from igw.datalayer.kvevents.index import KVBlockIndex

__all__ = ["REPLAY_OUTCOMES", "KVEventMetrics"]

REPLAY_OUTCOMES = ("ok", "incomplete", "timeout", "error")
"""``ok``: the gap was filled; ``incomplete``: the engine's buffer no longer held it; ``timeout`` and
``error``: no usable answer. Every outcome but ``ok`` clears the endpoint's entries."""


class KVEventMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.registry = registry
        self.received = Counter("igw_kv_events_received", "KV-event messages received.", registry=r)
        self.applied = Counter(
            "igw_kv_events_applied", "KV events applied to the index, by type.", ["type"], registry=r
        )
        self.decode_errors = Counter(
            "igw_kv_events_decode_errors", "KV-event messages that could not be decoded (dropped).", registry=r
        )
        self.skipped_unknown_type = Counter(
            "igw_kv_events_skipped_unknown_type", "KV events of a type this version does not know.", registry=r
        )
        self.gaps = Counter(
            "igw_kv_events_gaps", "Sequence gaps (missed messages) in an engine's event stream.", registry=r
        )
        self.replays = Counter(
            "igw_kv_events_replays", "Replay requests sent to an engine, by outcome.", ["outcome"], registry=r
        )
        self.endpoint_clears = Counter(
            "igw_kv_events_endpoint_clears",
            "Endpoints whose index entries were dropped because their stream could not be repaired "
            "(gap without replay, failed replay, engine restart).",
            registry=r,
        )
        self.duplicates = Counter(
            "igw_kv_events_duplicates", "Messages dropped as already applied (old sequence number).", registry=r
        )
        self.dropped_unknown_endpoint = Counter(
            "igw_kv_events_dropped_unknown_endpoint", "Messages from endpoints that are not in the pool.", registry=r
        )
        for outcome in REPLAY_OUTCOMES:
            self.replays.labels(outcome)
        for kind in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
            self.applied.labels(kind)

    def watch_index(self, index: KVBlockIndex) -> None:
        """Expose the index's sizes and counters, read at scrape time."""
        self.registry.register(_IndexCollector(index))


class _IndexCollector(Collector):
    def __init__(self, index: KVBlockIndex) -> None:
        self._index = index

    def collect(self) -> Iterable[Metric]:
        index = self._index
        stats = index.stats()
        keys = GaugeMetricFamily("igw_kv_events_index_keys", "Request keys (prefix blocks) held by the index.")
        keys.add_metric([], stats.keys)
        hashes = GaugeMetricFamily("igw_kv_events_index_engine_hashes", "Engine block hashes tracked, all endpoints.")
        hashes.add_metric([], stats.engine_hashes)
        spec = GaugeMetricFamily("igw_kv_events_index_speculative", "Speculative (not yet confirmed) entries.")
        spec.add_metric([], stats.speculative)
        unknown = CounterMetricFamily(
            "igw_kv_events_unknown_parent_blocks", "Stored blocks not indexed: their parent block was unknown."
        )
        unknown.add_metric([], index.unknown_parent_blocks)
        evicted = CounterMetricFamily(
            "igw_kv_events_index_evicted_keys", "Request keys dropped by the index's memory bound."
        )
        evicted.add_metric([], index.evicted_keys)
        return [keys, hashes, spec, unknown, evicted]
