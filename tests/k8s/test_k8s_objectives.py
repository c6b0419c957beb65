"""ObjectiveController: objectives, rewrites and legacy InferenceModels from the fake API server."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from conftest import FAST, eventually
from k8s_fakeapi import MODELS, OBJECTIVES, REWRITES, FakeKube, objective, rewrite, rule
from kubernetes_asyncio import client

from igw import aio
from igw.controllers.objectives import ObjectiveController
from igw.datalayer.objectives import ObjectiveStore
from igw.datalayer.rewrites import RewriteStore


@dataclass
class Rig:
    controller: ObjectiveController
    objectives: ObjectiveStore
    rewrites: RewriteStore


@pytest.fixture
async def rig(kube: FakeKube, api: client.ApiClient) -> AsyncIterator[Rig]:
    objectives, rewrites = ObjectiveStore(), RewriteStore(rng=random.Random(11))
    controller = ObjectiveController(
        api, pool_name="pool", namespace="default", objectives=objectives, rewrites=rewrites, settings=FAST
    )
    task = aio.spawn(controller.run(), name="test objective controller")
    await eventually(lambda: controller.synced, what="synced")
    yield Rig(controller, objectives, rewrites)
    await aio.cancel_and_wait(task)


async def test_objectives_follow_the_cluster(kube: FakeKube, rig: Rig) -> None:
    kube.create(OBJECTIVES, objective("chat", 10))
    kube.create(OBJECTIVES, objective("batch", -5))
    kube.create(OBJECTIVES, objective("elsewhere", 99, pool_name="other-pool"))
    await eventually(lambda: rig.objectives.items() == {"chat": 10, "batch": -5}, what="two objectives")
    kube.patch(OBJECTIVES, "chat", lambda o: o["spec"].update(priority=3))
    await eventually(lambda: rig.objectives.priority("chat") == 3, what="the new priority")
    kube.delete(OBJECTIVES, "batch")
    await eventually(lambda: not rig.objectives.known("batch"), what="batch deleted")
    assert rig.objectives.priority("batch") == 0


async def test_rewrites_follow_the_cluster_with_weights(kube: FakeKube, rig: Rig) -> None:
    kube.create(REWRITES, rewrite("canary", [rule(["llama"], [("llama-v1", 80), ("llama-v2", 20)])]))
    await eventually(lambda: rig.rewrites.rule_for("llama") is not None, what="the rewrite")
    counts = Counter(rig.rewrites.rewrite("llama") for _ in range(10_000))
    assert abs(counts["llama-v2"] / 10_000 - 0.2) < 0.02, counts  # sd 0.004: 5 sd
    decision = rig.rewrites.decide("llama")
    assert decision is not None
    assert decision.model == "llama"
    assert decision.rule == "InferenceModelRewrite/default/canary"

    kube.patch(
        REWRITES, "canary", lambda o: o["spec"]["rules"][0].update(targets=[{"modelRewrite": "llama-v2", "weight": 1}])
    )
    await eventually(lambda: rig.rewrites.rewrite("llama") == "llama-v2", what="the full cut-over")
    assert {rig.rewrites.rewrite("llama") for _ in range(200)} == {"llama-v2"}
    kube.delete(REWRITES, "canary")
    await eventually(lambda: rig.rewrites.rewrite("llama") is None, what="no rewrite")


async def test_legacy_inference_models(kube: FakeKube, rig: Rig) -> None:
    kube.create(
        MODELS,
        {
            "metadata": {"name": "review"},
            "spec": {
                "modelName": "food-review",
                "criticality": "Critical",
                "poolRef": {"group": "inference.networking.x-k8s.io", "kind": "InferencePool", "name": "pool"},
                "targetModels": [{"name": "food-review-1", "weight": 50}, {"name": "food-review-2", "weight": 50}],
            },
        },
    )
    await eventually(lambda: rig.objectives.known("review"), what="the legacy objective")
    assert rig.objectives.priority("review") == 1
    assert rig.rewrites.objective_for("food-review") == "review"
    assert {rig.rewrites.rewrite("food-review") for _ in range(200)} == {"food-review-1", "food-review-2"}
    # an InferenceObjective of the same name wins over the legacy mapping
    kube.create(OBJECTIVES, objective("review", 7))
    await eventually(lambda: rig.objectives.priority("review") == 7, what="the objective overriding")
    # an InferenceModelRewrite for the same model wins over targetModels
    kube.create(REWRITES, rewrite("explicit", [rule(["food-review"], [("food-review-3", 1)])]))
    await eventually(lambda: rig.rewrites.rewrite("food-review") == "food-review-3", what="the explicit rewrite")


async def test_missing_crds_count_as_empty(kube: FakeKube, api: client.ApiClient) -> None:
    for resource in (OBJECTIVES, REWRITES, MODELS):
        kube.uninstall(resource)
    objectives, rewrites = ObjectiveStore({"stale": 1}), RewriteStore()
    controller = ObjectiveController(
        api,
        pool_name="pool",
        namespace="default",
        objectives=objectives,
        rewrites=rewrites,
        settings=FAST,
        legacy=False,
    )
    task = aio.spawn(controller.run(), name="test objective controller")
    try:
        await eventually(lambda: controller.synced, what="synced although nothing is installed")
        assert objectives.items() == {}
        assert len(controller.reflectors) == 2  # no legacy InferenceModel watch
        assert kube.count("list", MODELS) == 0
    finally:
        await aio.cancel_and_wait(task)
