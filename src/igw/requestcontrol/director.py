"""The request path, top to bottom.

``handle_request`` reads like the architecture diagram: parse, objective, candidates,
admission, producers, scheduling, pre-request hooks, routing, accounting. Each stage lives in
its own package or plugin; the director only sequences them and times each one. Stages raise
:class:`~igw.api.errors.IgwError` subclasses; the ext_proc layer maps them to statuses.
(Candidates come before admission because saturation is judged over the endpoints that could
serve the request, as the reference does.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from igw.accounting.tracker import RequestTracker
from igw.api.context import RequestContext
from igw.api.errors import IgwError, ModelNotFound, NoEndpoint, SchedulingFailed
from igw.api.protocol import MODEL_REWRITE_HEADER, OBJECTIVE_HEADER
from igw.api.types import EndpointState, InferenceRequest
from igw.datalayer.objectives import ObjectiveStore
from igw.datalayer.rewrites import RewriteStore
from igw.datalayer.store import EndpointStore
from igw.flowcontrol.admission import Admission
from igw.framework.requestcontrol import (
    DataProducer,
    Parser,
    PreRequest,
    ResponseCompleteHook,
    ResponseHeadersHook,
)
from igw.observability.decisions import DECISION_HEADER, EXPLAIN_HEADER, DecisionLog, explain_header
from igw.observability.metrics import EppMetrics, TimedPlugin
from igw.routing.destination import RouteDecision, route
from igw.routing.model_rewrite import rewrite_body
from igw.scheduling.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class Hooks:
    """The request-control plugins, in the order they run."""

    producers: Sequence[DataProducer] = ()
    pre_request: Sequence[PreRequest] = ()
    response_headers: Sequence[ResponseHeadersHook] = ()
    response_complete: Sequence[ResponseCompleteHook] = ()


@dataclass(frozen=True, slots=True)
class Availability:
    """Endpoints whose metrics are stale or whose scrapes keep failing are left out of the
    candidates while others remain (standalone mode's stand-in for Kubernetes readiness)."""

    staleness_threshold: float = 2.0
    max_consecutive_failures: int = 3
    clock: Callable[[], float] = field(default=time.monotonic)


class Director:
    def __init__(
        self,
        *,
        store: EndpointStore,
        parser: Parser,
        admission: Admission,
        scheduler: Scheduler,
        tracker: RequestTracker,
        metrics: EppMetrics,
        hooks: Hooks = Hooks(),
        objectives: ObjectiveStore | None = None,
        rewrites: RewriteStore | None = None,
        availability: Availability | None = None,
        decisions: DecisionLog | None = None,
        explain_top: int | None = None,
        honour_subset_hint: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.parser = parser
        self.admission = admission
        self.scheduler = scheduler
        self.tracker = tracker
        self.metrics = metrics
        self.objectives = objectives or ObjectiveStore()
        self.rewrites = rewrites or RewriteStore()
        self.availability = availability or Availability()
        self.decisions = decisions or DecisionLog(0)
        self.explain_top = explain_top
        """Answer ``x-igw-explain`` with this many candidates; ``None``: the header is ignored."""
        self.honour_subset_hint = honour_subset_hint
        self._clock = clock
        pm = metrics.plugins
        self._producers = [TimedPlugin(p, "PrepareData", pm) for p in hooks.producers]
        self._pre_request = [TimedPlugin(p, "PreRequest", pm) for p in hooks.pre_request]
        self._response_headers = [TimedPlugin(p, "ResponseReceived", pm) for p in hooks.response_headers]
        self._response_complete = [TimedPlugin(p, "ResponseComplete", pm) for p in hooks.response_complete]
        self._parse = TimedPlugin(parser, "Parse", pm)
        stage = metrics.stage_duration
        self._t_parse = stage.labels("parse")
        self._t_admission = stage.labels("admission")
        self._t_producers = stage.labels("producers")
        self._t_schedule = stage.labels("schedule")

    async def handle_request(self, ctx: RequestContext, body: bytes) -> RouteDecision:
        """Decide where the request goes; raise an :class:`IgwError` to refuse it."""
        return self.decide(ctx, body)

    def decide(self, ctx: RequestContext, body: bytes) -> RouteDecision:
        """:meth:`handle_request` without the event loop (no stage awaits today; the simulator's
        virtual-time replay calls it directly)."""
        t0 = self._clock()
        # 1 parsing: body -> InferenceRequest (a BadRequest is the client's; anything else a 500)
        try:
            request = self.parser.parse(body, path=ctx.path, request_id=ctx.request_id, headers=ctx.headers)
        except IgwError:
            raise
        except Exception:
            self._parse.errors()
            raise
        ctx.request = request
        t1 = self._clock()
        self._t_parse.observe(t1 - t0)
        self._parse.observe(t1 - t0)
        return self._route(ctx, request, t1)

    def handle_headers_only(self, ctx: RequestContext) -> RouteDecision:
        """A request without a body (``GET /v1/models``): any candidate will do, load-aware."""
        request = InferenceRequest(request_id=ctx.request_id, model=None, path=ctx.path, body_size=0,
                                   headers=ctx.headers)  # fmt: skip
        ctx.request = request
        return self._route(ctx, request, self._clock())

    def _route(self, ctx: RequestContext, request: InferenceRequest, t0: float) -> RouteDecision:
        # 2 objective and model: InferenceObjective -> priority; InferenceModelRewrite -> target model
        objective = ctx.headers.get(OBJECTIVE_HEADER) or self.rewrites.objective_for(request.model)
        if objective:
            request.objective = objective
            request.priority = self.objectives.priority(objective)
        new_body = self._rewrite_model(ctx, request)
        # 3 candidates: the pool, narrowed to the model, the proxy's subset hint, the available
        candidates = self.candidates(request, ctx.subset_hint)
        # 4 admission: shed sheddable requests on a saturated pool, caps, admitter plugins
        self.admission.admit(request, candidates)
        t1 = self._clock()
        self._t_admission.observe(t1 - t0)
        # 5 producers: data for the scorers (prefix matches, in-flight load), in dependency order
        for producer in self._producers:
            producer.guarded(producer.plugin.prepare, request, candidates)
        t2 = self._clock()
        self._t_producers.observe(t2 - t1)
        # 6 scheduling: profile handler -> filters -> weighted scorers -> picker
        try:
            result = self.scheduler.schedule(request, candidates)
        except (NoEndpoint, SchedulingFailed):
            self.metrics.scheduler_attempts.labels("failure").inc()
            raise
        self.metrics.scheduler_attempts.labels("success").inc()
        # 7 pre-request hooks: indexes and load counters learn the pick
        for pre in self._pre_request:
            pre.guarded(pre.plugin.pre_request, request, result)
        elapsed = self._clock() - t2
        self._t_schedule.observe(elapsed)
        self.metrics.scheduler_duration.observe(elapsed)
        self.decisions.record(request, result)
        # 8 routing: destination header + envoy.lb metadata (+ the body, if the model changed)
        decision = route(result)
        decision.body = new_body
        ctx.destination = decision.destination
        if self.explain_top is not None and ctx.headers.get(EXPLAIN_HEADER):
            ctx.explanation = explain_header(request, result, top=self.explain_top)
        # 9 accounting: charge the pick one in-flight request until the stream ends
        self.tracker.started(ctx, decision.primary)
        return decision

    def may_rewrite_model(self, ctx: RequestContext) -> bool:
        """Known from the headers alone: could this request's model be rewritten? (Then the
        response body must pass through the EPP to get the client's model name back.)"""
        return bool(self.rewrites.rules()) or MODEL_REWRITE_HEADER in ctx.headers

    def _rewrite_model(self, ctx: RequestContext, request: InferenceRequest) -> bytes | None:
        """Choose the model the server gets; return the rewritten body, or None if unchanged."""
        model = request.model
        if model is None or request.body is None:
            return None
        target = ctx.headers.get(MODEL_REWRITE_HEADER)
        rule = "header"
        if not target:
            decided = self.rewrites.decide(model)
            if decided is None:
                return None
            target, rule = decided.target, decided.rule
        guard = self.metrics.model_label
        self.metrics.rewrite_decisions.labels(rule, guard(model), guard(target)).inc()
        if target == model:
            return None
        request.target_model = target
        return rewrite_body(request.body, target)

    def candidates(self, request: InferenceRequest, subset_hint: list[str] | None) -> Sequence[EndpointState]:
        states: Sequence[EndpointState] = self.store.endpoints()
        if not states:
            raise NoEndpoint(f"pool {self.store.pool_name!r} has no endpoints")
        model = request.effective_model
        if model is not None:
            declared = self.store.declared_models()
            if declared is not None and model not in declared:
                raise ModelNotFound(f"model {model!r} is not served by pool {self.store.pool_name!r}")
            if self.store.some_declare_models:
                states = [s for s in states if s.endpoint.models is None or model in s.endpoint.models]
        if subset_hint is not None and self.honour_subset_hint:
            states = subset(states, subset_hint)
            if not states:
                raise NoEndpoint("no pool endpoint matches the proxy's subset hint")
        return available(states, self.availability)

    # -- response path ---------------------------------------------------------------------------
    def request_failed(self, ctx: RequestContext, error: IgwError) -> None:
        self.tracker.failed(ctx, error)

    def on_response_headers(self, ctx: RequestContext, *, status: int | None, served: str | None) -> dict[str, str]:
        """Record the response; return the headers to add to the client's response."""
        self.tracker.response_headers(ctx, status=status, served=served)
        out: dict[str, str] = {}
        request = ctx.request
        if request is not None:
            for hook in self._response_headers:
                extra = hook.guarded(hook.plugin.on_response_headers, request, ctx.picked, status)
                if extra:
                    out.update(extra)
        if ctx.explanation is not None:
            out[DECISION_HEADER] = ctx.explanation
        return out

    def on_stream_end(self, ctx: RequestContext) -> None:
        """The ext_proc stream ended (request complete, aborted or failed): exactly-once cleanup."""
        if ctx.finished:
            return
        endpoint = ctx.picked
        self.tracker.finished(ctx)
        request = ctx.request
        if endpoint is None or request is None:
            return
        for done in self._response_complete:
            done.guarded(done.plugin.on_response_complete, request, endpoint)


def subset(states: Sequence[EndpointState], hint: list[str]) -> list[EndpointState]:
    """Endpoints named by the hint: an exact ``ip:port`` match, else every port of that IP."""
    addresses = {s.address for s in states}
    exact = {h for h in hint if h in addresses}
    hosts = {h.rpartition(":")[0].strip("[]") if ":" in h else h for h in hint if h not in exact}
    return [s for s in states if s.address in exact or s.endpoint.host in hosts]


def available(states: Sequence[EndpointState], rule: Availability) -> Sequence[EndpointState]:
    """The endpoints with fresh metrics and working scrapes; all of them if none qualifies."""
    oldest = rule.clock() - rule.staleness_threshold  # -inf when nothing is ever stale
    max_failures = rule.max_consecutive_failures
    fresh = [s for s in states if s.metrics.scraped_at >= oldest and s.failures < max_failures]
    if len(fresh) == len(states):
        return states
    return fresh or states
