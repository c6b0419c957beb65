"""``igw run``: the Endpoint Picker plus a real Envoy in front of a static pool.

Starts the EPP, then Envoy with a generated bootstrap, waits until Envoy is live and sees the
EPP healthy, and on SIGINT/SIGTERM stops Envoy (no new requests) and then the EPP (drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import aiohttp

from igw import aio
from igw.app.envoy import EnvoyError, EnvoyProcess, EnvoySettings, render_bootstrap
from igw.app.epp import Epp
from igw.config.pool import PoolSpec
from igw.config.settings import EppSettings

log = logging.getLogger("igw.gateway")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    epp: EppSettings
    envoy: EnvoySettings
    envoy_log_level: str = "warning"
    start_timeout_s: float = 30.0


class Gateway(aio.Service):
    def __init__(
        self,
        settings: GatewaySettings,
        pool: PoolSpec,
        *,
        config_text: str | None = None,
        config_source: str = "configuration",
    ) -> None:
        self.settings = settings
        self.epp = Epp(settings.epp, pool, config_text=config_text, config_source=config_source)
        self.envoy: EnvoyProcess | None = None

    @property
    def url(self) -> str:
        s = self.settings.envoy
        host = f"[{s.listen_host}]" if ":" in s.listen_host else s.listen_host
        return f"http://{host}:{s.listen_port}"

    async def start(self) -> None:
        await self.epp.start()
        try:
            self.envoy = EnvoyProcess(
                self.bootstrap(),
                admin_port=self.settings.envoy.admin_port,
                concurrency=self.settings.envoy.concurrency,
                log_level=self.settings.envoy_log_level,
            )
            await self.envoy.start(timeout=self.settings.start_timeout_s)
            await self._wait_epp_healthy_in_envoy(self.settings.start_timeout_s)
        except BaseException:
            await self.stop()
            raise

    def bootstrap(self) -> dict[str, Any]:
        """The Envoy bootstrap for the running EPP (a seam for gateways that need more filters)."""
        srv = self.settings.epp.server
        epp_host = "127.0.0.1" if srv.host in ("0.0.0.0", "") else srv.host
        return render_bootstrap(
            self.settings.envoy,
            epp_host=epp_host,
            epp_port=self.epp.grpc_port,
            epp_health_port=self.epp.health_port,
            endpoints=[s.endpoint for s in self.epp.store.endpoints()],
        )

    async def _wait_epp_healthy_in_envoy(self, timeout: float) -> None:
        """Envoy health-checks the EPP over gRPC; wait for its first verdict to be healthy."""
        url = f"http://127.0.0.1:{self.settings.envoy.admin_port}/clusters"
        marker = "igw_epp::"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as resp:
                        text = await resp.text()
                    flags = [ln for ln in text.splitlines() if ln.startswith(marker) and "::health_flags::" in ln]
                    if flags and all(ln.endswith("::healthy") for ln in flags):
                        return
                if asyncio.get_running_loop().time() > deadline:
                    raise EnvoyError(f"Envoy does not see the EPP healthy after {timeout:.0f}s")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
            self.envoy = None
        await self.epp.stop()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_gateway(
    settings: GatewaySettings, pool: PoolSpec, *, config_text: str | None = None, config_source: str = "configuration"
) -> None:
    async with Gateway(settings, pool, config_text=config_text, config_source=config_source) as gw:
        epp = gw.epp
        host = settings.epp.server.host
        print(
            f"igw: gateway ready on {gw.url} -> {len(epp.store.endpoints())} endpoint(s) of pool {pool.name!r}\n"
            f"igw: EPP ext_proc {host}:{epp.grpc_port}, health {host}:{epp.health_port}, "
            f"metrics http://{host}:{epp.metrics_port}/metrics\n"
            "igw: Ctrl-C to stop",
            flush=True,
        )
        await wait_for_signal()
        print("igw: stopping", flush=True)
