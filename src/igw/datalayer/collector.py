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

import aiohttp

from igw import aio
from igw.api.types import Endpoint
from igw.config.settings import DataLayerSettings
from igw.datalayer.engines import ENGINE_METRICS
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
        self._session: aiohttp.ClientSession | None = None
        self._readers = {engine: MetricsReader(spec) for engine, spec in ENGINE_METRICS.items()}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=self._settings.scrape_timeout),
            auto_decompress=True,
        )
        self._store.on_change(self._sync)
        self._sync()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._scraping.clear()
        await aio.cancel_and_wait(*tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sync(self) -> None:
        if self._session is None:
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
        assert self._session is not None
        spec = ENGINE_METRICS[endpoint.engine]
        reader = self._readers[endpoint.engine]
        path = self._settings.metrics_path or spec.metrics_path
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        url = f"http://{host}:{endpoint.port}{path}"
        interval = self._settings.scrape_interval
        failures = 0
        while True:
            started = self._clock()
            try:
                async with self._session.get(url) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                    text = await resp.text()
                self._store.update_metrics(endpoint.address, reader.read(text, now=self._clock()))
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                reason = str(exc) or type(exc).__name__
                self._store.record_scrape_error(endpoint.address, reason, failures)
                if failures == self._settings.max_consecutive_failures:
                    log.warning("endpoint %s: metrics scrape failing: %s", endpoint.address, reason)
            await asyncio.sleep(max(0.0, interval - (self._clock() - started)))
