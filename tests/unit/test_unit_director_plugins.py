"""The director with configured plugins: objectives and shedding, producers and hooks in order,
plugin failures handled by the written policy, decision explanations and the ring buffer."""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
import pytest
from prometheus_client import CollectorRegistry

from igw.api.context import RequestContext
from igw.api.errors import Shed
from igw.api.types import Endpoint, EndpointMetrics, EndpointState, InferenceRequest
from igw.app.epp import build_director, load_config
from igw.config.settings import EppSettings, ObservabilitySettings
from igw.datalayer.objectives import ObjectiveStore
from igw.datalayer.store import EndpointStore
from igw.framework.registry import register
from igw.framework.scheduling import Scorer
from igw.observability.decisions import DECISION_HEADER, EXPLAIN_HEADER
from igw.observability.metrics import EppMetrics
from igw.requestcontrol.director import Director

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
A, B = "10.0.0.1:8000", "10.0.0.2:8000"


@register
class _ExplodingScorer(Scorer):
    type_name = "test-exploding-scorer"

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        raise RuntimeError("boom")


def make(
    config: str | None = None,
    *,
    waiting: dict[str, float] | None = None,
    objectives: dict[str, int] | None = None,
    settings: EppSettings | None = None,
) -> tuple[Director, EndpointStore, EppMetrics]:
    store = EndpointStore(pool_name="pool")
    store.set_endpoints([Endpoint(a, *Endpoint.parse_address(a)) for a in (A, B)])
    now = time.monotonic()
    for address in (A, B):
        store.update_metrics(address, EndpointMetrics(waiting=(waiting or {}).get(address, 0.0), scraped_at=now))
    metrics = EppMetrics(CollectorRegistry())
    director = build_director(
        settings or EppSettings(),
        store,
        metrics,
        load_config(config, store, source="test"),
        objectives=ObjectiveStore(objectives),
    )
    return director, store, metrics


def ctx(headers: dict[str, str] | None = None, rid: str = "r1") -> RequestContext:
    return RequestContext(
        request_id=rid, path="/v1/completions", headers=dict(headers or {}), started_at=time.monotonic()
    )


def body(prompt: str = "hello " * 40) -> bytes:
    return orjson.dumps({"model": "m", "prompt": prompt})


async def test_objective_sets_priority_and_sheddable_requests_are_shed_when_saturated() -> None:
    director, _, _ = make(waiting={A: 50, B: 50}, objectives={"batch": -1, "chat": 10})
    with pytest.raises(Shed, match="sheddable"):
        await director.handle_request(ctx({"x-gateway-inference-objective": "batch"}), body())
    c = ctx({"x-gateway-inference-objective": "chat"}, rid="r2")
    await director.handle_request(c, body())
    assert c.request is not None
    assert (c.request.objective, c.request.priority) == ("chat", 10)
    c = ctx({"x-gateway-inference-objective": "unknown"}, rid="r3")
    await director.handle_request(c, body())
    assert c.request is not None
    assert c.request.priority == 0


async def test_sheddable_requests_pass_while_the_pool_has_room() -> None:
    director, _, _ = make(objectives={"batch": -1})
    decision = await director.handle_request(ctx({"x-gateway-inference-objective": "batch"}), body())
    assert decision.primary in (A, B)


async def test_prefix_affinity_follows_the_first_pick() -> None:
    director, _, _ = make()
    prompt = "You are a helpful assistant. " * 40
    first = await director.handle_request(ctx(rid="1"), body(prompt))
    for i in range(5):
        again = await director.handle_request(ctx(rid=f"x{i}"), body(prompt + f" question {i}"))
        assert again.primary == first.primary


async def test_response_hooks_add_headers_and_completion_releases_load() -> None:
    config = HEAD + (
        "plugins:\n- type: session-affinity-scorer\n- type: token-load-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: session-affinity-scorer, weight: 10},"
        " {pluginRef: token-load-scorer}]\n"
    )
    director, _, _ = make(config)
    c = ctx()
    decision = await director.handle_request(c, body())
    added = director.on_response_headers(c, status=200, served=decision.primary)
    token = added["x-session-token"]
    c2 = ctx({"x-session-token": token}, rid="r2")
    again = await director.handle_request(c2, body())
    assert again.primary == decision.primary
    director.on_stream_end(c)
    director.on_stream_end(c2)
    director.on_stream_end(c2)
    load = [p for p in director._producers if p.plugin.type_name == "inflight-load-producer"]
    assert len(load) == 1
    assert load[0].plugin.load == {}  # type: ignore[attr-defined]


async def test_a_failing_scorer_scores_zero_and_is_counted() -> None:
    config = HEAD + (
        "plugins:\n- type: test-exploding-scorer\n- type: queue-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: test-exploding-scorer}, {pluginRef: queue-scorer}]\n"
    )
    director, _, metrics = make(config, waiting={A: 5, B: 0})
    decision = await director.handle_request(ctx(), body())
    assert decision.primary == B
    labels = {
        "extension_point": "Scorer",
        "plugin_type": "test-exploding-scorer",
        "plugin_name": "test-exploding-scorer",
    }
    assert metrics.registry.get_sample_value("igw_plugin_errors_total", labels) == 1
    assert (
        metrics.registry.get_sample_value(
            "inference_extension_plugin_duration_seconds_count",
            {"extension_point": "Scorer", "plugin_type": "queue-scorer", "plugin_name": "queue-scorer"},
        )
        == 1
    )


async def test_explanation_header_only_when_enabled() -> None:
    director, _, _ = make(waiting={A: 3, B: 0})
    c = ctx({EXPLAIN_HEADER: "1"})
    await director.handle_request(c, body())
    assert DECISION_HEADER not in director.on_response_headers(c, status=200, served=None)

    enabled = EppSettings(observability=ObservabilitySettings(decision_header=True, explain_top=1))
    director, _, _ = make(waiting={A: 3, B: 0}, settings=enabled)
    plain = ctx(rid="plain")
    await director.handle_request(plain, body())
    assert DECISION_HEADER not in director.on_response_headers(plain, status=200, served=None)
    c = ctx({EXPLAIN_HEADER: "1"}, rid="asked")
    decision = await director.handle_request(c, body())
    explained = orjson.loads(director.on_response_headers(c, status=200, served=None)[DECISION_HEADER])
    assert explained["picked"] == decision.primary == B
    assert explained["requestId"] == "asked"
    assert explained["weights"] == {"queue-scorer": 2.0, "kv-cache-utilization-scorer": 2.0, "prefix-cache-scorer": 3.0}
    assert len(explained["candidates"]) == 1  # explain_top
    best = explained["candidates"][0]
    assert best["endpoint"] == B
    assert best["scores"]["queue-scorer"] == 1.0
    assert best["total"] == pytest.approx(sum(explained["weights"][k] * v for k, v in best["scores"].items()))


async def test_recent_decisions_are_kept_newest_first_and_bounded() -> None:
    settings = EppSettings(observability=ObservabilitySettings(recent_decisions=3))
    director, _, _ = make(settings=settings)
    for i in range(5):
        await director.handle_request(ctx(rid=f"r{i}"), body())
    recent = director.decisions.render()
    assert [d["requestId"] for d in recent] == ["r4", "r3", "r2"]
    assert {c["endpoint"] for c in recent[0]["candidates"]} == {A, B}
    assert recent[0]["filters"] == [{"name": "(pool)", "left": 2}]


async def test_prefix_indexer_metrics() -> None:
    director, _, metrics = make()
    prompt = "A shared system prompt that is long enough to fill several blocks. " * 10
    for i in range(4):
        await director.handle_request(ctx(rid=f"p{i}"), body(prompt + str(i)))
    sample = metrics.registry.get_sample_value
    assert (sample("inference_extension_prefix_indexer_size") or 0) > 0
    assert sample("inference_extension_prefix_indexer_hit_ratio_count") == 4
    assert (sample("inference_extension_prefix_indexer_hit_ratio_sum") or 0) > 2.5  # 3 of 4 hit most blocks
    assert (sample("inference_extension_prefix_indexer_hit_bytes_sum") or 0) > 0


async def test_rewrite_weights_are_honoured_through_the_director() -> None:
    import random

    from igw.datalayer.rewrites import RewriteRule, RewriteStore, RewriteTarget

    director, _, metrics = make()
    director.rewrites = RewriteStore(
        [RewriteRule("canary", frozenset({"m"}), (RewriteTarget("m-v1", 3), RewriteTarget("m-v2", 1)))],
        rng=random.Random(3),
    )
    sent: list[str] = []
    for i in range(2000):
        decision = await director.handle_request(ctx(rid=f"w{i}"), body())
        assert decision.body is not None
        sent.append(orjson.loads(decision.body)["model"])
    share = sent.count("m-v1") / len(sent)
    assert 0.72 < share < 0.78  # 3:1
    counted = {
        t: metrics.registry.get_sample_value(
            "inference_extension_model_rewrite_decisions_total",
            {"model_rewrite_name": "canary", "model_name": "m", "target_model": t},
        )
        for t in ("m-v1", "m-v2")
    }
    assert counted == {"m-v1": sent.count("m-v1"), "m-v2": sent.count("m-v2")}
