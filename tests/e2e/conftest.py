"""Fixtures for the tests through real Envoy (defined in e2e_support)."""

from e2e_support import fleet, http, start_gateway, trap

__all__ = ["fleet", "http", "start_gateway", "trap"]
