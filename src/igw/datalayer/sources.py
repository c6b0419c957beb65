"""``metrics-data-source``: where and how each endpoint's Prometheus page is fetched.

Parameters (reference/gie-protocol.md §3): ``scheme`` (``http`` or ``https``, default
``http``), ``path`` (default: the engine's own path, ``/metrics`` or trtllm-serve's
``/prometheus/metrics``) and ``insecureSkipVerify`` (default true: model servers behind a pool
rarely have certificates for their pod IPs).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import field_validator

from igw.datalayer.httpget import HttpGetter
from igw.framework.plugin import Handle, Plugin, PluginParams
from igw.framework.registry import register


class MetricsSourceParams(PluginParams):
    scheme: Literal["http", "https"] = "http"
    path: str | None = None
    """Metrics path for every endpoint; ``None``: each engine's default."""
    insecure_skip_verify: bool = True
    """With ``https``: accept any server certificate."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"path must start with '/', got {value!r}")
        return value


@register
class MetricsDataSource(Plugin):
    """Builds one keep-alive :class:`HttpGetter` per endpoint; one TLS context for all of them."""

    type_name = "metrics-data-source"
    Params = MetricsSourceParams

    def __init__(
        self,
        name: str | None = None,
        *,
        scheme: Literal["http", "https"] = "http",
        path: str | None = None,
        insecure_skip_verify: bool = True,
    ) -> None:
        super().__init__(name)
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        self.scheme = scheme
        self.path = path
        self.insecure_skip_verify = insecure_skip_verify
        self._ssl: ssl.SSLContext | None = None

    @classmethod
    def from_params(cls, name: str, params: MetricsSourceParams, handle: Handle) -> MetricsDataSource:
        return cls(name, scheme=params.scheme, path=params.path, insecure_skip_verify=params.insecure_skip_verify)

    def describe(self) -> Mapping[str, Any]:
        return {"scheme": self.scheme, "path": self.path, "insecureSkipVerify": self.insecure_skip_verify}

    def ssl_context(self) -> ssl.SSLContext | None:
        """``None`` for http; for https one shared context (building one loads the CA store)."""
        if self.scheme != "https":
            return None
        if self._ssl is None:
            context = ssl.create_default_context()
            if self.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        return self._ssl

    def getter(self, host: str, port: int, default_path: str, *, timeout: float) -> HttpGetter:
        """A getter for one endpoint: this source's ``path`` if set, else ``default_path``."""
        return HttpGetter(host, port, self.path or default_path, timeout=timeout, ssl=self.ssl_context())
