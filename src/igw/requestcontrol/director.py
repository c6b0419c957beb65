"""The request path, top to bottom.

``handle_request`` reads like the architecture diagram: parse, objective, admission,
candidates, producers, scheduling, routing, accounting. Each stage lives in its own package;
the director only sequences them and times each one. Stages raise
:class:`~igw.api.errors.IgwError` subclasses; the ext_proc layer maps them to statuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from igw.accounting.tracker import RequestTracker
from igw.api.context import RequestContext
from igw.api.errors import IgwError, ModelNotFound, NoEndpoint
from igw.api.types import EndpointState, InferenceRequest
from igw.datalayer.store import EndpointStore
from igw.flowcontrol.admission import Admission
from igw.observability.metrics import EppMetrics
from igw.parsing.openai import parse_request
from igw.routing.destination import RouteDecision, route
from igw.scheduling.scheduler import Scheduler


class Director:
    def __init__(
        self,
        *,
        store: EndpointStore,
        admission: Admission,
        scheduler: Scheduler,
        tracker: RequestTracker,
        metrics: EppMetrics,
        honour_subset_hint: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.admission = admission
        self.scheduler = scheduler
        self.tracker = tracker
        self.metrics = metrics
        self.honour_subset_hint = honour_subset_hint
        self._clock = clock
        stage = metrics.stage_duration
        self._t_parse = stage.labels("parse")
        self._t_admission = stage.labels("admission")
        self._t_schedule = stage.labels("schedule")

    async def handle_request(self, ctx: RequestContext, body: bytes) -> RouteDecision:
        """Decide where the request goes; raise an :class:`IgwError` to refuse it."""
        t0 = self._clock()
        # 1 parsing: OpenAI body -> InferenceRequest
        request = parse_request(body, path=ctx.path, request_id=ctx.request_id, headers=ctx.headers)
        ctx.request = request
        t1 = self._clock()
        self._t_parse.observe(t1 - t0)
        # 2 objective: InferenceObjective -> priority, InferenceModelRewrite -> target model
        #   (Kubernetes mode; in standalone mode every request has priority 0 and no rewrite)
        # 3 flow control: admit or shed
        self.admission.admit(request)
        t2 = self._clock()
        self._t_admission.observe(t2 - t1)
        return self._schedule_and_route(ctx, request, t2)

    def handle_headers_only(self, ctx: RequestContext) -> RouteDecision:
        """A request without a body (``GET /v1/models``): any candidate will do, load-aware."""
        request = InferenceRequest(request_id=ctx.request_id, model=None, path=ctx.path, body_size=0,
                                   headers=ctx.headers)  # fmt: skip
        ctx.request = request
        return self._schedule_and_route(ctx, request, self._clock())

    def _schedule_and_route(self, ctx: RequestContext, request: InferenceRequest, t0: float) -> RouteDecision:
        # 4 candidates: the pool, narrowed to the model and the proxy's subset hint
        candidates = self.candidates(request, ctx.subset_hint)
        # 5 producers: none in the default configuration yet (prefix hashes, token counts)
        # 6 scheduling: filters -> weighted scorers -> picker
        try:
            result = self.scheduler.schedule(request, candidates)
        except NoEndpoint:
            self.metrics.scheduler_attempts.labels("failure").inc()
            raise
        self.metrics.scheduler_attempts.labels("success").inc()
        elapsed = self._clock() - t0
        self._t_schedule.observe(elapsed)
        self.metrics.scheduler_duration.observe(elapsed)
        # 7 routing: destination header + envoy.lb metadata
        decision = route(result)
        ctx.destination = decision.destination
        # 8 accounting: charge the pick one in-flight request until the stream ends
        self.tracker.started(ctx, decision.primary)
        return decision

    def candidates(self, request: InferenceRequest, subset_hint: list[str] | None) -> Sequence[EndpointState]:
        states: Sequence[EndpointState] = self.store.endpoints()
        if not states:
            raise NoEndpoint(f"pool {self.store.pool_name!r} has no endpoints")
        model = request.model
        if model is not None:
            declared = self.store.declared_models()
            if declared is not None and model not in declared:
                raise ModelNotFound(f"model {model!r} is not served by pool {self.store.pool_name!r}")
            states = [s for s in states if s.endpoint.models is None or model in s.endpoint.models]
        if subset_hint is not None and self.honour_subset_hint:
            states = subset(states, subset_hint)
            if not states:
                raise NoEndpoint("no pool endpoint matches the proxy's subset hint")
        return states

    # -- response path ---------------------------------------------------------------------------
    def request_failed(self, ctx: RequestContext, error: IgwError) -> None:
        self.tracker.failed(ctx, error)

    def on_response_headers(self, ctx: RequestContext, *, status: int | None, served: str | None) -> None:
        self.tracker.response_headers(ctx, status=status, served=served)

    def on_stream_end(self, ctx: RequestContext) -> None:
        """The ext_proc stream ended (request complete, aborted or failed): exactly-once cleanup."""
        self.tracker.finished(ctx)


def subset(states: Sequence[EndpointState], hint: list[str]) -> list[EndpointState]:
    """Endpoints named by the hint: an exact ``ip:port`` match, else every port of that IP."""
    addresses = {s.address for s in states}
    exact = {h for h in hint if h in addresses}
    hosts = {h.rpartition(":")[0].strip("[]") if ":" in h else h for h in hint if h not in exact}
    return [s for s in states if s.address in exact or s.endpoint.host in hosts]
