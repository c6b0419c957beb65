"""Pure mapping of wire objects: pools, pods -> endpoints, objectives, rewrites, legacy models."""

from __future__ import annotations

import pytest
from k8s_fakeapi import objective, pod, pool, rewrite, rule

from igw.api.types import Endpoint
from igw.controllers.resources import (
    ENGINE_TYPE_LABEL,
    InvalidObject,
    PoolInfo,
    legacy_models,
    objective_priorities,
    parse_pool,
    parse_selector_flag,
    pod_endpoints,
    rewrite_rules,
)
from igw.datalayer.extractors import CoreMetricsExtractor

POOL = PoolInfo("pool", "default", (("app", "vllm"),), (8000,))


def addresses(endpoints: list[Endpoint]) -> list[str]:
    return [e.address for e in endpoints]


# -- pools ----------------------------------------------------------------------------------------


def test_parse_v1_pool() -> None:
    obj = pool("p", selector={"b": "2", "a": "1"}, ports=[8000, 8001])
    obj["metadata"]["namespace"] = "ns"
    info = parse_pool(obj)
    assert info == PoolInfo("p", "ns", (("a", "1"), ("b", "2")), (8000, 8001))
    assert info.label_selector() == "a=1,b=2"


def test_parse_pre_ga_pool() -> None:
    obj = {"metadata": {"name": "old"}, "spec": {"selector": {"app": "x"}, "targetPortNumber": 8080}}
    assert parse_pool(obj) == PoolInfo("old", "", (("app", "x"),), (8080,))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "no targetPorts"),
        ({"selector": {"matchLabels": {}}, "targetPorts": [{"number": 1}]}, "at least one label"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": []}, "1 to 8"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 0}]}, "1-65535"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": 5}, {"number": 5}]}, "twice"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetPorts": [{"number": p} for p in range(1, 10)]}, "1 to 8"),
    ],
    ids=["no-ports", "empty-selector", "zero-ports", "port-0", "duplicate", "nine-ports"],
)
def test_invalid_pools(spec: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidObject, match=message):
        parse_pool({"metadata": {"name": "p"}, "spec": spec})


def test_selector_flag() -> None:
    assert parse_selector_flag("app=vllm, tier = gpu") == (("app", "vllm"), ("tier", "gpu"))
    for bad in ("", "app", "app==x", "=x"):
        with pytest.raises(ValueError):
            parse_selector_flag(bad)


# -- pods -----------------------------------------------------------------------------------------


def test_ready_pods_become_one_endpoint_per_target_port() -> None:
    pods = [pod("b", "10.0.0.2"), pod("a", "10.0.0.1")]
    two_ports = PoolInfo("pool", "default", (("app", "vllm"),), (8000, 8001))
    assert addresses(pod_endpoints(pods, two_ports)) == [
        "10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.2:8000", "10.0.0.2:8001",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "obj",
    [
        pod("x", "10.0.0.9", ready=False),
        pod("x", "10.0.0.9", terminating=True),
        pod("x", None),
        pod("x", "10.0.0.9", labels={"app": "other"}),
        {"metadata": {"name": "x", "labels": {"app": "vllm"}}, "status": {"podIP": "10.0.0.9"}},
    ],
    ids=["not-ready", "terminating", "no-ip", "other-labels", "no-conditions"],
)
def test_pods_that_are_not_endpoints(obj: dict[str, object]) -> None:
    assert pod_endpoints([obj], POOL) == []


def test_active_ports_annotation_narrows_the_target_ports() -> None:
    ports = PoolInfo("pool", "default", (("app", "vllm"),), (8000, 8001, 8002))
    pods = [
        pod("a", "10.0.0.1", annotations={"inference.networking.k8s.io/active-ports": "8002, 8000,9999,junk"}),
        pod("b", "10.0.0.2", annotations={"inference.networking.k8s.io/active-ports": ""}),
        pod("c", "10.0.0.3"),
    ]
    assert addresses(pod_endpoints(pods, ports)) == [
        "10.0.0.1:8000", "10.0.0.1:8002", "10.0.0.3:8000", "10.0.0.3:8001", "10.0.0.3:8002",
    ]  # fmt: skip


def test_pod_labels_carry_the_engine_type_to_the_data_layer() -> None:
    labels = {"app": "vllm", ENGINE_TYPE_LABEL: "sglang"}
    (endpoint,) = pod_endpoints([pod("a", "10.0.0.1", labels=labels)], POOL)
    assert endpoint.engine is None  # the pool declares none: the label decides
    assert dict(endpoint.labels) == labels
    assert CoreMetricsExtractor().engine_for(endpoint).name == "sglang"


def test_ipv6_pods_and_duplicate_addresses() -> None:
    pods = [pod("a", "fd00::1"), pod("b", "fd00::1")]
    assert addresses(pod_endpoints(pods, POOL)) == ["[fd00::1]:8000"]


# -- objectives and rewrites ----------------------------------------------------------------------


def test_objective_priorities_of_this_pool_only() -> None:
    other_group = objective("g", 5)
    other_group["spec"]["poolRef"]["group"] = "inference.networking.x-k8s.io"
    objs = [
        objective("chat", 10),
        objective("batch", -1),
        objective("unset", None),
        objective("x", 3, pool_name="other"),
        other_group,
    ]
    assert objective_priorities(objs, "pool") == {"chat": 10, "batch": -1, "unset": 0}


def test_rewrite_rules_in_precedence_order() -> None:
    newer = rewrite("newer", [rule(["a"], [("a-new", None)])], created="2026-02-01T00:00:00Z")
    older = rewrite(
        "older",
        [rule(["a"], [("a-old", 1)]), rule([], [("any", 1)])],
        created="2026-01-01T00:00:00Z",
    )
    foreign = rewrite("foreign", [rule(["a"], [("x", 1)])], pool_name="other")
    rules = rewrite_rules([newer, foreign, older], "pool")
    assert [(r.name, sorted(r.models), [t.model for t in r.targets]) for r in rules] == [
        ("InferenceModelRewrite//older", ["a"], ["a-old"]),
        ("InferenceModelRewrite//older", [], ["any"]),
        ("InferenceModelRewrite//newer", ["a"], ["a-new"]),
    ]


def test_invalid_rewrite_rules_are_skipped() -> None:
    bad = rewrite(
        "bad",
        [
            {"targets": []},
            rule(["a"], [("ok", 1)]),
            {"matches": [{"model": {"type": "Prefix", "value": "a"}}], "targets": [{"modelRewrite": "x"}]},
        ],
    )
    assert [sorted(r.models) for r in rewrite_rules([bad], "pool")] == [["a"]]


def test_legacy_inference_model_mapping() -> None:
    def model(
        name: str,
        model_name: str,
        criticality: str | None,
        targets: list[dict[str, object]] | None = None,
        created: str = "2025-01-01T00:00:00Z",
    ) -> dict[str, object]:
        spec: dict[str, object] = {
            "modelName": model_name,
            "poolRef": {"group": "inference.networking.x-k8s.io", "name": "pool"},
        }
        if criticality:
            spec["criticality"] = criticality
        if targets:
            spec["targetModels"] = targets
        return {"metadata": {"name": name, "creationTimestamp": created}, "spec": spec}

    legacy = legacy_models(
        [
            model(
                "review",
                "food-review",
                "Critical",
                [{"name": "food-review-1", "weight": 90}, {"name": "food-review-2", "weight": 10}],
            ),
            model("chat", "chat", None),
            model("batch", "batch", "Sheddable"),
            model("dup", "chat", "Critical", created="2025-06-01T00:00:00Z"),
        ],
        "pool",
    )
    assert legacy.priorities == {"review": 1, "chat": 0, "batch": -1}
    assert legacy.model_objectives == {"food-review": "review", "chat": "chat", "batch": "batch"}
    (only,) = legacy.rules
    assert only.models == frozenset({"food-review"})
    assert [(t.model, t.weight) for t in only.targets] == [("food-review-1", 90), ("food-review-2", 10)]


def test_rewrite_weights_are_all_or_none() -> None:
    mixed = rewrite("mixed", [rule(["a"], [("a-1", 1000), ("a-2", None)])])
    fine = rewrite("fine", [rule(["b"], [("b-1", None), ("b-2", None)]), rule(["c"], [("c-1", 3), ("c-2", 1)])])
    rules = rewrite_rules([mixed, fine], "pool")
    assert {m for r in rules for m in r.models} == {"b", "c"}  # the mixed rule is refused, the others load
