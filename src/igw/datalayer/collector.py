"""Scrapes every endpoint's metrics on a fixed period and writes snapshots into the store.

One task per endpoint, started and stopped as the pool changes. A failed scrape leaves the
old snapshot in place (it ages into staleness) and counts a failure; the scheduler's
availability check reads both.

The configuration's ``dataLayer`` section maps onto it: the ``metrics-data-source`` plugin says
how to fetch (scheme, path, TLS), the ``core-metrics-extractor`` plugin which engine's names
apply to each endpoint; ``sources: []`` is ``enabled=False`` (no scraping at all). The path
scraped is the source's ``path``, else ``DataLayerSettings.metrics_path``, else the engine's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from igw import aio
from igw.api.types import Endpoint
from igw.config.settings import DataLayerSettings
from igw.datalayer.extractors import CoreMetricsExtractor
from igw.datalayer.httpget import ScrapeError
from igw.datalayer.promtext import MetricsReader
from igw.datalayer.sources import MetricsDataSource
from igw.datalayer.store import EndpointStore

log = logging.getLogger("igw.datalayer")


class MetricsCollector:
    def __init__(
        self,
        store: EndpointStore,
        settings: DataLayerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        source: MetricsDataSource | None = None,
        extractor: CoreMetricsExtractor | None = None,
        enabled: bool = True,
    ) -> None:
        """``source`` and ``extractor`` default to the plugins with default parameters;
        ``enabled=False`` makes :meth:`start` a no-op (endpoints are never scraped)."""
        self._store = store
        self._settings = settings
        self._clock = clock
        self.source = source or MetricsDataSource()
        self.extractor = extractor or CoreMetricsExtractor()
        self.enabled = enabled
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scraping: dict[str, Endpoint] = {}
        self._running = False
        self._readers = {name: MetricsReader(config) for name, config in self.extractor.engines.items()}

    async def start(self) -> None:
        if not self.enabled:
            log.info("metrics collection is disabled (dataLayer.sources is empty)")
            return
        self._running = True
        self._store.on_change(self._sync)
        self._sync()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._scraping.clear()
        self._running = False
        await aio.cancel_and_wait(*tasks)

    def _sync(self) -> None:
        if not self._running:
            return
        wanted = {state.address: state.endpoint for state in self._store.endpoints()}
        for address in list(self._tasks):
            if wanted.get(address) != self._scraping.get(address):  # gone, or redefined (engine, labels)
                self._tasks.pop(address).cancel()
                del self._scraping[address]
        for address, endpoint in wanted.items():
            if address not in self._tasks:
                self._scraping[address] = endpoint
                self._tasks[address] = aio.spawn(self._scrape_loop(endpoint), name=f"scrape {address}")

    async def _scrape_loop(self, endpoint: Endpoint) -> None:
        config = self.extractor.engine_for(endpoint)
        reader = self._readers[config.name]
        getter = self.source.getter(
            endpoint.host,
            endpoint.port,
            self._settings.metrics_path or config.metrics_path,
            timeout=self._settings.scrape_timeout,
        )
        interval = self._settings.scrape_interval
        failures = 0
        try:
            while True:
                started = self._clock()
                try:
                    status, body = await getter.get()
                    if status != 200:
                        raise ScrapeError(f"HTTP {status}")
                    metrics = reader.read(body.decode("utf-8", "replace"), now=self._clock())
                    self._store.update_metrics(endpoint.address, metrics)
                    failures = 0
                except Exception as exc:  # ScrapeError, or a bug: never let one scrape end the loop
                    if not isinstance(exc, ScrapeError):
                        log.exception("endpoint %s: unexpected scrape error", endpoint.address)
                    failures += 1
                    self._store.record_scrape_error(endpoint.address, str(exc), failures)
                    if failures == self._settings.max_consecutive_failures:
                        log.warning("endpoint %s: metrics scrape failing: %s", endpoint.address, exc)
                await asyncio.sleep(max(0.0, interval - (self._clock() - started)))
        finally:
            getter.close()
