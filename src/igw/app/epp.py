"""The Endpoint Picker process: store, collector, scheduler, director and the three servers.

Start-up order: pool -> collector -> servers -> readiness. Shutdown, in steps: readiness
off, stop accepting streams and let in-flight ones drain for ``drain_seconds``, cancel the
rest, stop the collector.
"""

from __future__ import annotations

import dataclasses
import logging
from types import TracebackType

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from igw.accounting.tracker import RequestTracker
from igw.config.pool import PoolSpec
from igw.config.settings import EppSettings, SchedulingSettings
from igw.datalayer.collector import MetricsCollector
from igw.datalayer.store import EndpointStore
from igw.extproc.server import start_extproc_server
from igw.flowcontrol.admission import Admission
from igw.framework.scheduling import SchedulerProfile, WeightedScorer
from igw.observability.health import HealthState, start_health_server
from igw.observability.http import start_metrics_server
from igw.observability.metrics import EppMetrics
from igw.requestcontrol.director import Director
from igw.scheduling.plugins.availability_filter import AvailabilityFilter
from igw.scheduling.plugins.inflight_scorer import InflightScorer
from igw.scheduling.plugins.kv_cache_scorer import KvCacheUtilizationScorer
from igw.scheduling.plugins.max_score_picker import MaxScorePicker
from igw.scheduling.plugins.queue_scorer import QueueScorer
from igw.scheduling.scheduler import Scheduler

log = logging.getLogger("igw.epp")


def default_profile(settings: EppSettings) -> SchedulerProfile:
    """Queue depth and KV use (weights 2 and 2, as the reference default) plus local in-flight."""
    s: SchedulingSettings = settings.scheduling
    dl = settings.datalayer
    scorers = [
        WeightedScorer(QueueScorer(), s.queue_weight),
        WeightedScorer(KvCacheUtilizationScorer(), s.kv_cache_weight),
        WeightedScorer(InflightScorer(), s.inflight_weight),
    ]
    return SchedulerProfile(
        name="default",
        filters=(
            AvailabilityFilter(
                staleness_threshold=dl.staleness_threshold,
                max_consecutive_failures=dl.max_consecutive_failures,
            ),
        ),
        scorers=tuple(w for w in scorers if w.weight > 0),
        picker=MaxScorePicker(max_endpoints=1 + s.fallbacks),
    )


def build_director(settings: EppSettings, store: EndpointStore, metrics: EppMetrics) -> Director:
    """The request path over a store: admission, the default profile, in-flight accounting."""
    tracker = RequestTracker(store, metrics)
    return Director(
        store=store,
        admission=Admission(settings.admission, lambda: tracker.inflight),
        scheduler=Scheduler(default_profile(settings)),
        tracker=tracker,
        metrics=metrics,
        honour_subset_hint=settings.scheduling.honour_subset_hint,
    )


class Epp:
    def __init__(self, settings: EppSettings, pool: PoolSpec, *, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = EppMetrics(self.registry)
        self.store = EndpointStore(pool_name=pool.name)
        self.store.set_endpoints(pool.build())
        self.metrics.watch_pool(pool.name, self.store.endpoints)
        self.collector = MetricsCollector(self.store, settings.datalayer)
        self.director = build_director(settings, self.store, self.metrics)
        self.tracker = self.director.tracker
        self.profile = self.director.scheduler.profile
        self.health = HealthState()
        self._grpc: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        srv = self.settings.server
        try:
            self._health_server, self.health_port = await start_health_server(srv, self.health)
            await self.collector.start()
            self._grpc, self.grpc_port = await start_extproc_server(self.director, srv, self.metrics)
            if srv.metrics_port >= 0:
                self._metrics_runner, self.metrics_port = await start_metrics_server(
                    self.registry, srv.host, srv.metrics_port
                )
        except BaseException:
            await self.stop()
            raise
        await self.health.set_ready(self.store.synced)
        log.info("effective settings: %s", dataclasses.asdict(self.settings))
        log.info(
            "scheduling profile %r: filters %s, scorers %s, picker %s",
            self.profile.name,
            [f.type_name for f in self.profile.filters],
            [f"{w.scorer.type_name}x{w.weight:g}" for w in self.profile.scorers],
            self.profile.picker.type_name,
        )
        log.info(
            "endpoint picker ready: ext_proc %s:%d, health %d, metrics %d, pool %r with %d endpoints",
            srv.host, self.grpc_port, self.health_port, self.metrics_port,
            self.store.pool_name, len(self.store.endpoints()),
        )  # fmt: skip

    async def stop(self) -> None:
        await self.health.set_ready(False)
        if self._grpc is not None:
            await self._grpc.stop(grace=self.settings.server.drain_seconds)
            self._grpc = None
        await self.collector.stop()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._health_server is not None:
            await self.health.shutdown()
            await self._health_server.stop(grace=0.5)
            self._health_server = None

    async def __aenter__(self) -> Epp:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
