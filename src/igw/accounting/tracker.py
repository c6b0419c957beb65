"""Counts requests in and out of endpoints and records their metrics.

``started`` charges the picked endpoint one in-flight request; ``finished`` (called once, at
the end of the ext_proc stream, including client aborts) releases it. If the proxy reports
that another endpoint served the request (a fallback), the charge moves there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from igw.api.context import RequestContext
from igw.api.errors import IgwError
from igw.datalayer.store import EndpointStore
from igw.observability.metrics import EppMetrics


class RequestTracker:
    def __init__(
        self, store: EndpointStore, metrics: EppMetrics, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self.inflight = 0
        """Requests picked and not yet finished, over all endpoints."""

    def started(self, ctx: RequestContext, address: str) -> None:
        ctx.picked = address
        self._store.request_started(address)
        self.inflight += 1
        m = self._metrics
        model = m.model_label(ctx.model)
        target = m.model_label(ctx.request.effective_model) if ctx.request else model
        priority = str(ctx.request.priority) if ctx.request else "0"
        m.requests.labels(model, target, priority).inc()
        m.running.labels(model).inc()
        if ctx.request is not None:
            m.request_sizes.labels(model, target).observe(ctx.request.body_size)

    def failed(self, ctx: RequestContext, error: IgwError) -> None:
        ctx.error = error.code
        model = self._metrics.model_label(ctx.model)
        self._metrics.errors.labels(model, model, error.code.value).inc()

    def response_headers(self, ctx: RequestContext, *, status: int | None, served: str | None) -> None:
        ctx.status = status
        if served and ctx.picked and served != ctx.picked and self._store.get(served) is not None:
            self._store.request_finished(ctx.picked)
            self._store.request_started(served)
            ctx.picked = served
        ctx.served = served
        model = self._metrics.model_label(ctx.model)
        self._metrics.ttfb.labels(model).observe(self._clock() - ctx.started_at)
        if status is not None and status >= 500:
            self._metrics.errors.labels(model, model, "ModelServerError").inc()

    def finished(self, ctx: RequestContext) -> None:
        if ctx.finished:
            return
        ctx.finished = True
        if ctx.picked is None:
            return
        self._store.request_finished(ctx.picked)
        self.inflight -= 1
        model = self._metrics.model_label(ctx.model)
        self._metrics.running.labels(model).dec()
        self._metrics.duration.labels(model, model).observe(self._clock() - ctx.started_at)
        if ctx.status is None:
            self._metrics.ended_before_response.inc()
