"""The arms of a comparison: spec strings, Envoy-alone policies, and one Envoy arm in front of a fleet."""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from igw_bench.arms import ENVOY_ARMS, PEER_KINDS, ArmSpec, parse_arm, start_arm
from igw_bench.envoy_alone import LB_POLICIES, envoy_alone_bootstrap
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet

_peers = importlib.import_module("igw_bench.peers")
needs_peer_policies = pytest.mark.skipif(
    not hasattr(_peers, "POLICIES"),
    reason="igw_bench.peers has no POLICIES yet (the peer routers' module is being written)",
)


# --------------------------------------------------------------------------------------------
# parse_arm


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("igw", ArmSpec("igw", "igw", "")),
        ("  igw ", ArmSpec("igw", "igw", "")),
        ("envoy-rr", ArmSpec("envoy-rr", "envoy", "ROUND_ROBIN")),
        ("envoy-lr", ArmSpec("envoy-lr", "envoy", "LEAST_REQUEST")),
        ("random", ArmSpec("random", "envoy", "RANDOM")),
    ],
    ids=["igw", "igw-padded", "envoy-rr", "envoy-lr", "random"],
)
def test_parse_arm_accepts_the_built_in_arms(spec: str, expected: ArmSpec) -> None:
    assert parse_arm(spec) == expected


def test_an_igw_arm_with_a_config_file_is_named_after_the_file(tmp_path: Path) -> None:
    config = tmp_path / "prefix-heavy.yaml"
    config.write_text("apiVersion: x\n")
    arm = parse_arm(f"igw:{config}")
    assert arm == ArmSpec("igw:prefix-heavy", "igw", str(config))
    assert str(config) in arm.describe()


def test_an_igw_arm_needs_an_existing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no configuration file"):
        parse_arm(f"igw:{tmp_path / 'missing.yaml'}")
    with pytest.raises(ValueError, match="no configuration file"):
        parse_arm(f"igw:{tmp_path}")  # a directory is not a file


@pytest.mark.parametrize("spec", ["", "nginx", "envoy", "envoy-rr:x", "igw-lr", "round_robin"])
def test_parse_arm_rejects_unknown_arms_naming_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown arm") as info:
        parse_arm(spec)
    message = str(info.value)
    for form in ("igw", "igw:FILE", *ENVOY_ARMS, *(f"{k}:POLICY" for k in PEER_KINDS)):
        assert form in message


@needs_peer_policies
@pytest.mark.parametrize(
    ("spec", "kind", "policy"),
    [
        ("sglang-router:cache_aware", "sglang-router", "cache_aware"),
        ("vllm-router:cache_aware", "vllm-router", "cache_aware"),
        ("vllm-router:round_robin", "vllm-router", "round_robin"),
    ],
)
def test_parse_arm_accepts_peer_routers_with_their_policies(spec: str, kind: str, policy: str) -> None:
    assert policy in _peers.POLICIES[kind]
    arm = parse_arm(spec)
    assert arm == ArmSpec(spec, kind, policy)
    assert policy in arm.describe()


@needs_peer_policies
@pytest.mark.parametrize("spec", ["sglang-router", "sglang-router:", "vllm-router:no_such_policy"])
def test_parse_arm_rejects_a_peer_without_one_of_its_policies(spec: str) -> None:
    kind = spec.partition(":")[0]
    with pytest.raises(ValueError, match="policies are") as info:
        parse_arm(spec)
    assert all(p in str(info.value) for p in _peers.POLICIES[kind])


@needs_peer_policies
def test_every_peer_kind_has_policies() -> None:
    assert set(PEER_KINDS) <= set(_peers.POLICIES)


def test_describe_says_what_runs() -> None:
    assert "default" in parse_arm("igw").describe()
    assert parse_arm("envoy-lr").describe() == "Envoy alone, lb_policy LEAST_REQUEST"


# --------------------------------------------------------------------------------------------
# Envoy alone with a policy


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_envoy_alone_bootstrap_balances_with_the_given_policy(policy: str) -> None:
    config = envoy_alone_bootstrap(8000, 9000, ["127.0.0.1:1", "127.0.0.1:2"], lb_policy=policy)
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["lb_policy"] == policy


def test_envoy_alone_bootstrap_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="MAGLEV"):
        envoy_alone_bootstrap(8000, 9000, ["127.0.0.1:1"], lb_policy="MAGLEV")


def test_every_envoy_arm_uses_a_policy_the_bootstrap_knows() -> None:
    assert set(ENVOY_ARMS.values()) <= set(LB_POLICIES)


# --------------------------------------------------------------------------------------------
# A real Envoy arm

FAST = EngineConfig(kv_blocks=64, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=1)


@pytest.fixture
async def fleet() -> AsyncIterator[list[str]]:
    async with SimFleet(ports=[0, 0], engine=FAST) as sim:
        yield sim.addresses


@pytest.mark.envoy
@pytest.mark.timeout(60)
async def test_an_envoy_round_robin_arm_spreads_requests_over_the_fleet(fleet: list[str], tmp_path: Path) -> None:
    arm = await start_arm(parse_arm("envoy-rr"), fleet, tmp_path, dilation=1.0, model="sim-model", timeout=30)
    try:
        assert arm.base_url.startswith("http://127.0.0.1:")
        assert set(arm.pids) == {"envoy"}
        config = json.loads((tmp_path / "envoy-rr-envoy.json").read_text())
        assert config["static_resources"]["clusters"][0]["lb_policy"] == "ROUND_ROBIN"
        answered_by = []
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                body = {"model": "sim-model", "prompt": " the question", "max_tokens": 2}
                async with http.post(f"{arm.base_url}/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    answered_by.append(resp.headers["x-igw-sim-endpoint"])
        assert set(answered_by) == set(fleet)
    finally:
        await arm.stop()
    (child,) = arm.children
    assert child.proc is not None
    assert child.proc.poll() is not None
