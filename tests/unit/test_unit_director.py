"""Director with the default profile: models, empty pool, subset hints, admission, in-flight accounting."""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
import pytest
from prometheus_client import CollectorRegistry

from igw.accounting.tracker import RequestTracker
from igw.api.context import RequestContext
from igw.api.errors import BadRequest, ModelNotFound, NoEndpoint, Shed
from igw.api.types import Endpoint, EndpointMetrics
from igw.app.epp import build_director
from igw.config.settings import AdmissionSettings, EppSettings, SchedulingSettings
from igw.datalayer.store import EndpointStore
from igw.observability.metrics import EppMetrics
from igw.requestcontrol.director import Director, subset


@dataclass
class Rig:
    store: EndpointStore
    tracker: RequestTracker
    metrics: EppMetrics
    director: Director

    def inflight(self) -> dict[str, int]:
        return {s.address: s.inflight for s in self.store.endpoints()}

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels or {})


def ep(address: str, models: list[str] | None = None) -> Endpoint:
    host, port = Endpoint.parse_address(address)
    return Endpoint(address, host, port, models=frozenset(models) if models is not None else None)


def rig(endpoints: list[Endpoint], settings: EppSettings | None = None) -> Rig:
    settings = settings or EppSettings()
    store = EndpointStore(pool_name="pool")
    store.set_endpoints(endpoints)
    now = time.monotonic()
    for s in store.endpoints():
        store.update_metrics(s.address, EndpointMetrics(scraped_at=now))
    metrics = EppMetrics(CollectorRegistry())
    director = build_director(settings, store, metrics)
    tracker = director.tracker
    return Rig(store, tracker, metrics, director)


def ctx(hint: list[str] | None = None, path: str = "/v1/completions", rid: str = "r1") -> RequestContext:
    return RequestContext(request_id=rid, path=path, headers={}, started_at=time.monotonic(), subset_hint=hint)


def body(model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "prompt": "hello"})


A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
A2 = "10.0.0.1:8001"
V6 = "[fd00::1]:8000"


# --------------------------------------------------------------------------------------------
# models and empty pools
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "model", "allowed"),
    [
        ([ep(A, ["m"]), ep(B, ["m"])], "m", {A, B}),
        ([ep(A, ["m"]), ep(B, ["other"])], "other", {B}),
        ([ep(A, ["m"]), ep(B)], "anything", {B}),
        ([ep(A), ep(B)], "anything", {A, B}),
    ],
    ids=["declared-all", "declared-one", "undeclared-endpoint-takes-any", "nothing-declared"],
)
async def test_model_selects_candidates(endpoints: list[Endpoint], model: str, allowed: set[str]) -> None:
    r = rig(endpoints)
    for i in range(10):
        c = ctx(rid=f"r{i}")
        decision = await r.director.handle_request(c, body(model))
        assert decision.primary in allowed
        assert c.picked == decision.primary
        r.director.on_stream_end(c)


async def test_unknown_model_is_model_not_found() -> None:
    r = rig([ep(A, ["m"]), ep(B, ["n"])])
    c = ctx()
    with pytest.raises(ModelNotFound) as info:
        await r.director.handle_request(c, body("gpt-4"))
    assert "gpt-4" in info.value.message
    assert "pool" in info.value.message
    assert c.picked is None
    assert r.inflight() == {A: 0, B: 0}
    assert r.tracker.inflight == 0


async def test_empty_pool_is_no_endpoint() -> None:
    r = rig([])
    with pytest.raises(NoEndpoint, match="no endpoints"):
        await r.director.handle_request(ctx(), body())
    with pytest.raises(NoEndpoint, match="no endpoints"):
        r.director.handle_headers_only(ctx())
    assert r.sample("inference_extension_scheduler_attempts_total", {"status": "success"}) is None


async def test_bad_body_is_bad_request_before_scheduling() -> None:
    r = rig([ep(A)])
    with pytest.raises(BadRequest):
        await r.director.handle_request(ctx(), b"{not json")
    assert r.tracker.inflight == 0


# --------------------------------------------------------------------------------------------
# subset hint
# --------------------------------------------------------------------------------------------

POOL = [A, A2, B, C, V6]


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        ([A], {A}),
        ([A, C], {A, C}),
        (["10.0.0.1"], {A, A2}),
        (["10.0.0.1:9999"], {A, A2}),
        ([A, "10.0.0.2:1"], {A, B}),
        (["[fd00::1]:8000"], {V6}),
        (["[fd00::1]:1234"], {V6}),
        (["10.9.9.9:8000"], set()),
        ([], set()),
        (["", "garbage"], set()),
    ],
    ids=[
        "exact",
        "two-exact",
        "ip-only",
        "ip-with-unknown-port",
        "exact-and-ip",
        "ipv6-exact",
        "ipv6-ip-match",
        "no-match",
        "empty-list",
        "junk",
    ],
)
def test_subset_matching(hint: list[str], expected: set[str]) -> None:
    store = EndpointStore()
    store.set_endpoints([ep(a) for a in POOL])
    assert {s.address for s in subset(store.endpoints(), hint)} == expected


@pytest.mark.parametrize(
    ("hint", "allowed"),
    [
        (None, set(POOL)),
        ([A], {A}),
        (["10.0.0.1"], {A, A2}),
        ([C, "10.0.0.2:7"], {B, C}),
    ],
    ids=["no-hint", "exact", "ip-only", "mixed"],
)
async def test_subset_hint_restricts_the_pick(hint: list[str] | None, allowed: set[str]) -> None:
    r = rig([ep(a) for a in POOL])
    seen: set[str] = set()
    for i in range(40):
        c = ctx(hint, rid=f"r{i}")
        decision = await r.director.handle_request(c, body())
        assert decision.primary in allowed
        seen.add(decision.primary)
        r.director.on_stream_end(c)
    assert seen == allowed  # load-aware scoring spreads over every allowed endpoint


@pytest.mark.parametrize("hint", [[], ["10.9.9.9:8000"]], ids=["empty-list", "no-match"])
async def test_subset_hint_without_match_is_no_endpoint(hint: list[str]) -> None:
    r = rig([ep(A), ep(B)])
    with pytest.raises(NoEndpoint, match="subset hint"):
        await r.director.handle_request(ctx(hint), body())
    with pytest.raises(NoEndpoint, match="subset hint"):
        r.director.handle_headers_only(ctx(hint))
    assert r.tracker.inflight == 0


@pytest.mark.parametrize("hint", [[], ["10.9.9.9:8000"], [B]], ids=["empty-list", "no-match", "other"])
async def test_subset_hint_ignored_when_disabled(hint: list[str]) -> None:
    settings = EppSettings(scheduling=SchedulingSettings(honour_subset_hint=False))
    r = rig([ep(A)], settings)
    decision = await r.director.handle_request(ctx(hint), body())
    assert decision.primary == A


# --------------------------------------------------------------------------------------------
# admission
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3], ids=["one", "three"])
async def test_max_inflight_sheds_with_429(limit: int) -> None:
    r = rig([ep(A), ep(B)], EppSettings(admission=AdmissionSettings(max_inflight_requests=limit)))
    admitted = []
    for i in range(limit):
        c = ctx(rid=f"ok{i}")
        await r.director.handle_request(c, body())
        admitted.append(c)
    with pytest.raises(Shed, match=f"limit {limit}"):
        await r.director.handle_request(ctx(rid="shed"), body())
    assert r.tracker.inflight == limit
    r.director.on_stream_end(admitted[0])
    again = ctx(rid="again")
    await r.director.handle_request(again, body())
    assert r.tracker.inflight == limit


async def test_no_limit_by_default() -> None:
    r = rig([ep(A)])
    for i in range(50):
        await r.director.handle_request(ctx(rid=f"r{i}"), body())
    assert r.tracker.inflight == 50
    assert r.inflight() == {A: 50}


# --------------------------------------------------------------------------------------------
# in-flight accounting
# --------------------------------------------------------------------------------------------


async def test_start_and_finish_charge_exactly_once() -> None:
    r = rig([ep(A)])
    c = ctx()
    decision = await r.director.handle_request(c, body())
    assert (decision.destination, decision.primary, c.destination, c.picked) == (A, A, A, A)
    assert decision.set_headers == {"x-gateway-destination-endpoint": A}
    assert r.inflight() == {A: 1}
    assert r.store.get(A).dispatched_since_scrape == 1  # type: ignore[union-attr]
    assert r.sample("inference_objective_running_requests", {"model_name": "m"}) == 1.0
    assert (
        r.sample("inference_objective_request_total", {"model_name": "m", "target_model_name": "m", "priority": "0"})
        == 1.0
    )
    for _ in range(3):
        r.director.on_stream_end(c)
    assert r.inflight() == {A: 0}
    assert r.tracker.inflight == 0
    assert c.finished
    assert r.sample("inference_objective_running_requests", {"model_name": "m"}) == 0.0
    assert (
        r.sample("inference_objective_request_duration_seconds_count", {"model_name": "m", "target_model_name": "m"})
        == 1.0
    )


async def test_finishing_one_request_twice_does_not_release_another() -> None:
    r = rig([ep(A)])
    first, second = ctx(rid="1"), ctx(rid="2")
    await r.director.handle_request(first, body())
    await r.director.handle_request(second, body())
    r.director.on_stream_end(first)
    r.director.on_stream_end(first)
    assert r.inflight() == {A: 1}
    assert r.tracker.inflight == 1
    r.director.on_stream_end(second)
    assert r.inflight() == {A: 0}


async def test_stream_end_without_pick_changes_nothing() -> None:
    r = rig([ep(A)])
    c = ctx()
    r.director.on_stream_end(c)
    assert c.finished
    assert r.tracker.inflight == 0
    assert r.inflight() == {A: 0}


@pytest.mark.parametrize(
    ("served", "moved"),
    [(B, True), ("10.9.9.9:8000", False), (None, False), ("", False)],
    ids=["fallback-served", "unknown-served", "none", "empty"],
)
async def test_served_endpoint_moves_the_charge(served: str | None, moved: bool) -> None:
    r = rig([ep(A), ep(B)], EppSettings(scheduling=SchedulingSettings(fallbacks=1)))
    r.store.update_metrics(B, EndpointMetrics(waiting=5, scraped_at=time.monotonic()))
    c = ctx()
    decision = await r.director.handle_request(c, body())
    assert decision.destination == f"{A},{B}"
    assert decision.primary == A
    assert r.inflight() == {A: 1, B: 0}
    r.director.on_response_headers(c, status=200, served=served)
    assert c.status == 200
    assert c.served == served
    assert r.inflight() == ({A: 0, B: 1} if moved else {A: 1, B: 0})
    assert c.picked == (B if moved else A)
    r.director.on_stream_end(c)
    r.director.on_stream_end(c)
    assert r.inflight() == {A: 0, B: 0}
    assert r.tracker.inflight == 0


async def test_model_server_error_status_is_counted() -> None:
    r = rig([ep(A)])
    c = ctx()
    await r.director.handle_request(c, body())
    r.director.on_response_headers(c, status=503, served=None)
    labels = {"model_name": "m", "target_model_name": "m", "error_code": "ModelServerError"}
    assert r.sample("inference_objective_request_error_total", labels) == 1.0


async def test_request_failed_records_error_code() -> None:
    r = rig([ep(A, ["m"])])
    c = ctx()
    with pytest.raises(ModelNotFound) as info:
        await r.director.handle_request(c, body("x"))
    r.director.request_failed(c, info.value)
    labels = {"model_name": "x", "target_model_name": "x", "error_code": "NotFound"}
    assert r.sample("inference_objective_request_error_total", labels) == 1.0


@pytest.mark.parametrize("fallbacks", [0, 1, 2, 5], ids=["none", "one", "two", "more-than-pool"])
async def test_fallbacks_list_distinct_endpoints_best_first(fallbacks: int) -> None:
    r = rig([ep(A), ep(B), ep(C)], EppSettings(scheduling=SchedulingSettings(fallbacks=fallbacks)))
    now = time.monotonic()
    r.store.update_metrics(A, EndpointMetrics(waiting=9, kv_usage=0.9, scraped_at=now))
    r.store.update_metrics(B, EndpointMetrics(waiting=0, kv_usage=0.0, scraped_at=now))
    r.store.update_metrics(C, EndpointMetrics(waiting=3, kv_usage=0.3, scraped_at=now))
    c = ctx()
    decision = await r.director.handle_request(c, body())
    assert decision.destination.split(",") == [B, C, A][: 1 + fallbacks]
    assert r.inflight() == {A: 0, B: 1, C: 0}


async def test_burst_spreads_over_equal_endpoints() -> None:
    addresses = [A, B, C, A2]
    r = rig([ep(a) for a in addresses])
    picks = [(await r.director.handle_request(ctx(rid=f"r{i}"), body())).primary for i in range(8)]
    assert sorted(picks[:4]) == sorted(addresses)
    assert sorted(picks[4:]) == sorted(addresses)
    assert r.inflight() == dict.fromkeys(addresses, 2)


async def test_stale_endpoints_are_avoided_while_others_are_fresh() -> None:
    r = rig([ep(A), ep(B)])
    r.store.update_metrics(A, EndpointMetrics(scraped_at=time.monotonic() - 60))
    for i in range(10):
        c = ctx(rid=f"r{i}")
        assert (await r.director.handle_request(c, body())).primary == B
        r.director.on_stream_end(c)


def test_headers_only_routes_without_a_model() -> None:
    r = rig([ep(A, ["m"])])
    c = ctx(path="/v1/models")
    decision = r.director.handle_headers_only(c)
    assert decision.primary == A
    assert c.request is not None
    assert c.request.model is None
    assert r.inflight() == {A: 1}
    r.director.on_stream_end(c)
    assert r.inflight() == {A: 0}
