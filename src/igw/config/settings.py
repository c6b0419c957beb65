"""Process settings, grouped by the part they configure; every limit is a named field.

Each field has a default and a docstring; the CLI maps flags onto these and nothing reads
settings from globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class BodyMode(StrEnum):
    """How the proxy sends the request body to the EPP (ext_proc ``request_body_mode``)."""

    FULL_DUPLEX_STREAMED = "FULL_DUPLEX_STREAMED"
    BUFFERED = "BUFFERED"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    """Address the gRPC and metrics servers bind to (``0.0.0.0`` in a cluster)."""
    grpc_port: int = 9002
    """ext_proc gRPC port."""
    health_port: int = 9003
    """gRPC health port (services ``liveness``, ``readiness``, the ext_proc service)."""
    metrics_port: int = 9090
    """Prometheus ``/metrics`` port; 0 disables the metrics server."""
    max_request_body_bytes: int = 32 * 1024 * 1024
    """Larger request bodies are refused with 413."""
    body_chunk_bytes: int = 62_000
    """Streamed body echo chunk size (some proxies cap streamed chunks at 64 KiB)."""
    default_body_mode: BodyMode = BodyMode.FULL_DUPLEX_STREAMED
    """Assumed when the proxy does not announce its mode in ``protocol_config``."""
    drain_seconds: float = 5.0
    """On shutdown, how long in-flight ext_proc streams may finish before they are cancelled."""
    secure_serving: bool = False
    """TLS on the ext_proc port (the reference EPP's default; gateways connect with TLS and skip
    verification). Off by default here: ``igw run``'s own Envoy talks to the EPP on loopback."""
    cert_path: str | None = None
    """Directory with ``tls.crt`` and ``tls.key``; None: a self-signed certificate made at start-up."""
    enable_cert_reload: bool = False
    """Re-read the certificate files when they change (for new connections)."""
    health_checking: bool = False
    """Also serve gRPC health on the ext_proc port (for gateways that health-check that port)."""


@dataclass(frozen=True, slots=True)
class DataLayerSettings:
    scrape_interval: float = 0.05
    """Seconds between two scrapes of one endpoint's ``/metrics``."""
    scrape_timeout: float = 1.0
    """A scrape that takes longer fails."""
    staleness_threshold: float = 2.0
    """Metrics older than this are stale: the endpoint is avoided while others are fresh."""
    max_consecutive_failures: int = 3
    """After this many failed scrapes in a row an endpoint is avoided (before it goes stale)."""
    metrics_path: str | None = None
    """Override of the engine's metrics path (vLLM ``/metrics``, trtllm-serve ``/prometheus/metrics``)."""


@dataclass(frozen=True, slots=True)
class SchedulingSettings:
    """What the EndpointPickerConfig file does not say (the file chooses the plugins)."""

    fallbacks: int = 0
    """Extra endpoints listed after the pick (comma list) for the proxy to retry on; pickers
    return at least ``1 + fallbacks`` endpoints whatever their ``maxNumOfEndpoints``."""
    honour_subset_hint: bool = True
    """Restrict candidates to the proxy's ``envoy.lb.subset_hint`` when it sends one."""


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    max_inflight_requests: int = 0
    """Requests in flight through this EPP above which new ones are shed with 429 (0: no limit)."""


@dataclass(frozen=True, slots=True)
class ObservabilitySettings:
    decision_header: bool = False
    """Answer a request's ``x-igw-explain`` header with the decision in ``x-igw-decision``
    (off by default: it tells clients about the pool)."""
    explain_top: int = 16
    """Candidates listed in the ``x-igw-decision`` header (best first; proxies limit header size)."""
    recent_decisions: int = 64
    """Decisions kept for ``/debug/decisions`` on the metrics port (0: none)."""


@dataclass(frozen=True, slots=True)
class EppSettings:
    server: ServerSettings = field(default_factory=ServerSettings)
    datalayer: DataLayerSettings = field(default_factory=DataLayerSettings)
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
