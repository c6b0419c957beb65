"""The Endpoint Picker process: store, collector, scheduler, director and the three servers.

Start-up order: pool -> collector -> servers -> readiness. Shutdown, in steps: readiness
off, stop accepting streams and let in-flight ones drain for ``drain_seconds``, cancel the
rest, stop the collector.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import grpc
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

import igw.app.plugins  # noqa: F401  (registers every plugin type)
from igw import aio
from igw.accounting.tracker import RequestTracker
from igw.api.types import EndpointState
from igw.config.loader import EppConfig, load_text
from igw.config.pool import ConfigError, PoolSpec
from igw.config.settings import EppSettings
from igw.datalayer.collector import MetricsCollector
from igw.datalayer.extractors import CoreMetricsExtractor
from igw.datalayer.objectives import ObjectiveStore
from igw.datalayer.rewrites import RewriteStore
from igw.datalayer.sources import MetricsDataSource
from igw.datalayer.store import EndpointStore
from igw.extproc.server import start_extproc_server
from igw.flowcontrol.admission import Admission
from igw.framework.plugin import Plugin
from igw.observability.decisions import DecisionLog
from igw.observability.health import HealthState, start_health_server
from igw.observability.http import start_metrics_server
from igw.observability.metrics import EppMetrics, PrefixIndexStats
from igw.requestcontrol.director import Availability, Director, Hooks
from igw.scheduling.scheduler import Scheduler

log = logging.getLogger("igw.epp")


class StoreHandle:
    """The :class:`~igw.framework.plugin.Handle` plugins get: the live pool of the store."""

    def __init__(self, store: EndpointStore) -> None:
        self._store = store
        self.clock: Callable[[], float] = store.clock

    def endpoints(self) -> Sequence[EndpointState]:
        return self._store.endpoints()

    def on_endpoints_change(self, listener: Callable[[], None]) -> None:
        self._store.on_change(listener)

    def plugin(self, name: str) -> Plugin | None:
        return None


def load_config(text: str | None, store: EndpointStore, *, source: str = "configuration") -> EppConfig:
    """Both loading phases over the store's pool (``None``: the default configuration)."""
    return load_text(text, StoreHandle(store), source=source)


def build_collector(settings: EppSettings, store: EndpointStore, config: EppConfig) -> MetricsCollector:
    """The metrics collector the configuration's ``dataLayer`` section asks for (none: off)."""
    if not config.data_sources:
        return MetricsCollector(store, settings.datalayer, enabled=False)
    if len(config.data_sources) > 1:
        names = ", ".join(s.source.name for s in config.data_sources)
        raise ConfigError(f"dataLayer: igw scrapes one metrics data source, {len(config.data_sources)} given ({names})")
    (ds,) = config.data_sources
    if not isinstance(ds.source, MetricsDataSource):
        raise ConfigError(f"dataLayer: {ds.source.name!r} (type {ds.source.type_name}) is not a metrics data source")
    if len(ds.extractors) > 1 or not all(isinstance(e, CoreMetricsExtractor) for e in ds.extractors):
        raise ConfigError(f"dataLayer source {ds.source.name!r}: give one core-metrics-extractor (or none)")
    extractor = ds.extractors[0] if ds.extractors else None
    assert extractor is None or isinstance(extractor, CoreMetricsExtractor)
    return MetricsCollector(store, settings.datalayer, source=ds.source, extractor=extractor)


def build_director(
    settings: EppSettings,
    store: EndpointStore,
    metrics: EppMetrics,
    config: EppConfig | None = None,
    *,
    objectives: ObjectiveStore | None = None,
    rewrites: RewriteStore | None = None,
) -> Director:
    """The request path over a store, as the configuration (default: the reference default) says."""
    config = config or load_config(None, store)
    for plugin in config.plugins.values():
        if isinstance(plugin, PrefixIndexStats):
            metrics.prefix.watch(plugin)
    for profile in config.profiles:  # the proxy's retries need fallbacks, whatever the picker says
        profile.picker.max_endpoints = max(profile.picker.max_endpoints, 1 + settings.scheduling.fallbacks)
    tracker = RequestTracker(store, metrics)
    dl, obs = settings.datalayer, settings.observability
    return Director(
        store=store,
        parser=config.parser,
        admission=Admission(
            settings.admission,
            lambda: tracker.inflight,
            detector=config.saturation_detector,
            admitters=config.admitters,
            metrics=metrics.plugins,
        ),
        scheduler=Scheduler(config.profiles, config.profile_handler, metrics=metrics.plugins),
        tracker=tracker,
        metrics=metrics,
        hooks=Hooks(
            producers=config.producers,
            pre_request=config.pre_request,
            response_headers=config.response_headers,
            response_complete=config.response_complete,
        ),
        objectives=objectives,
        rewrites=rewrites,
        availability=Availability(dl.staleness_threshold, dl.max_consecutive_failures, store.clock),
        decisions=DecisionLog(obs.recent_decisions),
        explain_top=obs.explain_top if obs.decision_header else None,
        honour_subset_hint=settings.scheduling.honour_subset_hint,
    )


class Epp(aio.Service):
    def __init__(
        self,
        settings: EppSettings,
        pool: PoolSpec,
        *,
        config_text: str | None = None,
        config_source: str = "configuration",
        registry: CollectorRegistry | None = None,
    ):
        self.settings = settings
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = EppMetrics(self.registry)
        self.store = EndpointStore(pool_name=pool.name)
        self.store.set_endpoints(pool.build())
        self.objectives = ObjectiveStore(pool.priorities())
        self.rewrites = RewriteStore()
        """Empty in standalone mode; the controllers fill it in Kubernetes mode."""
        self.config = load_config(config_text, self.store, source=config_source)
        self.metrics.watch_pool(pool.name, self.store.endpoints)
        self.collector = build_collector(settings, self.store, self.config)
        self.director = build_director(
            settings, self.store, self.metrics, self.config, objectives=self.objectives, rewrites=self.rewrites
        )
        self.tracker = self.director.tracker
        for plugin in self.config.plugins.values():
            plugin.register_metrics(self.registry)
        self.plugin_services = [s for p in self.config.plugins.values() for s in p.services()]
        self._started_services: list[aio.Service] = []
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
            for service in self.plugin_services:
                await service.start()
                self._started_services.append(service)
            self._grpc, self.grpc_port = await start_extproc_server(
                self.director, srv, self.metrics, health=self.health.servicer if srv.health_checking else None
            )
            if srv.metrics_port >= 0:
                self._metrics_runner, self.metrics_port = await start_metrics_server(
                    self.registry, srv.host, srv.metrics_port, self.director.decisions
                )
        except BaseException:
            await self.stop()
            raise
        await self.health.set_ready(self.store.synced)
        log.info("effective settings: %s", dataclasses.asdict(self.settings))
        log.info("effective configuration: %s", orjson.dumps(self.config.describe()).decode())
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
        while self._started_services:
            await self._started_services.pop().stop()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._health_server is not None:
            await self.health.shutdown()
            await self._health_server.stop(grace=0.5)
            self._health_server = None
