"""The endpoint store: the pool's endpoints with their latest metrics and local load.

Writers are the pool source (static file or controllers), the metrics collector and the
request accounting; readers are the scheduler. Everything runs on one event loop, so no
locks: a writer replaces a whole ``EndpointMetrics`` snapshot in one assignment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from igw.api.types import Endpoint, EndpointMetrics, EndpointState


class EndpointStore:
    """The pool: endpoints by address, in a stable order."""

    def __init__(self, *, pool_name: str = "default", clock: Callable[[], float] = time.monotonic) -> None:
        self.pool_name = pool_name
        self.clock = clock
        self._states: dict[str, EndpointState] = {}
        self._snapshot: tuple[EndpointState, ...] = ()
        self._listeners: list[Callable[[], None]] = []
        self._declared_models: frozenset[str] | None = None
        self.some_declare_models = False
        self.synced = False
        """True once the pool source has delivered its first complete view."""

    # -- pool source ---------------------------------------------------------------------------
    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the pool. Endpoints already present keep their metrics and load."""
        fresh: dict[str, EndpointState] = {}
        for ep in endpoints:
            state = self._states.get(ep.address)
            if state is None or state.endpoint != ep:
                new_state = EndpointState(ep)
                if state is not None:  # redefined (models, labels, engine): keep what was observed
                    for attr in ("metrics", "inflight", "dispatched_since_scrape", "failures", "last_error"):
                        setattr(new_state, attr, getattr(state, attr))
                state = new_state
            fresh[ep.address] = state
        self._states = fresh
        self._snapshot = tuple(fresh.values())
        self._declared_models = self._union_of_models()
        self.some_declare_models = any(s.endpoint.models is not None for s in self._snapshot)
        """False: every endpoint serves any model (the per-model filter can be skipped)."""
        self.synced = True
        for listener in self._listeners:
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every pool change (the collector starts/stops scrapers)."""
        self._listeners.append(listener)

    # -- readers -------------------------------------------------------------------------------
    def endpoints(self) -> tuple[EndpointState, ...]:
        """All endpoints, in pool order. The tuple is immutable; the states are live."""
        return self._snapshot

    def get(self, address: str) -> EndpointState | None:
        return self._states.get(address)

    def declared_models(self) -> frozenset[str] | None:
        """Union of the models the endpoints declare, or None if any endpoint declares none."""
        return self._declared_models

    def _union_of_models(self) -> frozenset[str] | None:
        models: set[str] = set()
        for state in self._snapshot:
            if state.endpoint.models is None:
                return None
            models |= state.endpoint.models
        return frozenset(models)

    # -- metrics collector ---------------------------------------------------------------------
    def update_metrics(self, address: str, metrics: EndpointMetrics) -> None:
        state = self._states.get(address)
        if state is not None:
            state.metrics = metrics
            state.dispatched_since_scrape = 0
            state.last_error = None
            state.failures = 0

    def record_scrape_error(self, address: str, error: str, failures: int) -> None:
        state = self._states.get(address)
        if state is not None:
            state.last_error = error
            state.failures = failures

    # -- accounting ----------------------------------------------------------------------------
    def request_started(self, address: str) -> None:
        state = self._states.get(address)
        if state is not None:
            state.inflight += 1
            state.dispatched_since_scrape += 1

    def request_finished(self, address: str) -> None:
        state = self._states.get(address)
        if state is not None and state.inflight > 0:
            state.inflight -= 1
