"""Turns a scheduling result into routing instructions for the proxy.

The destination is written twice with the same value, as the protocol requires: in the
``x-gateway-destination-endpoint`` header and in the ``envoy.lb`` dynamic metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from igw.api.protocol import DESTINATION_HEADER
from igw.framework.scheduling import SchedulingResult


@dataclass(slots=True)
class RouteDecision:
    destination: str
    """``ip:port[,ip:port...]``: the pick first, then fallbacks in order."""
    set_headers: dict[str, str] = field(default_factory=dict)
    """Request headers to set (the destination header included)."""
    body: bytes | None = None
    """A replacement request body, or ``None`` to forward the body unchanged."""

    @property
    def primary(self) -> str:
        return self.destination.split(",", 1)[0]


def route(result: SchedulingResult, *, extra_headers: dict[str, str] | None = None) -> RouteDecision:
    destination = ",".join(state.address for state in result.endpoints)
    headers = {DESTINATION_HEADER: destination}
    if extra_headers:
        headers.update(extra_headers)
    return RouteDecision(destination=destination, set_headers=headers)
