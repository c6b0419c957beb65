"""Scrapes every endpoint's metrics on a fixed period and writes snapshots into the store.

One task per endpoint, started and stopped as the pool changes. A failed scrape leaves the
old snapshot in place (it ages into staleness) and counts a failure; the scheduler's
availability check reads both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from igw import aio
from igw.api.types import Endpoint, Engine
from igw.config.settings import DataLayerSettings
from igw.datalayer.engines import ENGINE_METRICS
from igw.datalayer.httpget import HttpGetter, ScrapeError
from igw.datalayer.promtext import MetricsReader
from igw.datalayer.store import EndpointStore

log = logging.getLogger("igw.datalayer")


class MetricsCollector:
    def __init__(
        self,
        store: EndpointStore,
        settings: DataLayerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._scraping: dict[str, Endpoint] = {}
        self._running = False
        self._readers = {engine: MetricsReader(spec) for engine, spec in ENGINE_METRICS.items()}

    async def start(self) -> None:
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
            if wanted.get(address) != self._scraping.get(address):  # gone, or redefined (engine, path)
                self._tasks.pop(address).cancel()
                del self._scraping[address]
        for address, endpoint in wanted.items():
            if address not in self._tasks:
                self._scraping[address] = endpoint
                self._tasks[address] = aio.spawn(self._scrape_loop(endpoint), name=f"scrape {address}")

    async def _scrape_loop(self, endpoint: Endpoint) -> None:
        engine = Engine(endpoint.engine or Engine.VLLM)
        spec = ENGINE_METRICS[engine]
        reader = self._readers[engine]
        path = self._settings.metrics_path or spec.metrics_path
        getter = HttpGetter(endpoint.host, endpoint.port, path, timeout=self._settings.scrape_timeout)
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
