"""CRDs, examples and kustomize manifests: schemas, rendering, Kubernetes client models, the bootstrap."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml
from k8s_schema import jsonschema, load_crds, validate
from kubernetes_asyncio import client

from igw.controllers.resources import legacy_models, objective_priorities, parse_pool, rewrite_rules

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "kubernetes"
KUSTOMIZATIONS = [
    "config/crd",
    "deploy/base",
    "deploy/overlays/leader-election",
    "deploy/overlays/selector",
    "deploy/overlays/envoy-standalone",
    "deploy/gateways/envoy-gateway",
    "deploy/gateways/istio",
]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (Debian package kubernetes-client): kustomize rendering skipped"
)
CRDS = load_crds()


def docs(path: Path) -> Iterator[dict[str, Any]]:
    yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


def example(kind: str) -> list[dict[str, Any]]:
    return [d for path in sorted(EXAMPLES.glob("*.yaml")) for d in docs(path) if d["kind"] == kind]


# -- CRDs and examples ------------------------------------------------------------------------------


def test_the_crds_cover_every_api_igw_reads() -> None:
    assert set(CRDS) == {
        ("inference.networking.k8s.io/v1", "InferencePool"),
        ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"),
        ("inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite"),
        ("inference.networking.x-k8s.io/v1alpha2", "InferenceModel"),
    }


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    for obj in docs(path):
        if obj["apiVersion"].startswith("inference.networking"):
            assert validate(obj, CRDS) == [], obj["metadata"]["name"]


@pytest.mark.parametrize(
    ("kind", "change", "problem"),
    [
        ("InferencePool", lambda o: o["spec"].update(targetPorts=[]), "items out of bounds"),
        ("InferencePool", lambda o: o["spec"].update(targetPorts=[{"number": 1}, {"number": 1}]), "duplicate"),
        ("InferencePool", lambda o: o["spec"]["selector"].update(matchLabels={}), "properties out of bounds"),
        ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].update(failureMode="Maybe"), "not one of"),
        ("InferencePool", lambda o: o["spec"].update(targetPort=[{"number": 1}]), "unknown field"),
        ("InferencePool", lambda o: o["spec"].update(appProtocol="grpc"), "not one of"),
        ("InferenceObjective", lambda o: o["spec"].update(priority="high"), "expected integer"),
        ("InferenceObjective", lambda o: o["spec"].pop("poolRef"), "missing required 'poolRef'"),
        ("InferenceModelRewrite", lambda o: o["spec"]["rules"][0].update(targets=[]), "items out of bounds"),
        ("InferenceModelRewrite", lambda o: o["spec"]["rules"][0]["targets"][0].update(weight=0), "out of bounds"),
        ("InferenceModel", lambda o: o["spec"].update(criticality="Urgent"), "not one of"),
    ],
    ids=[
        "no-ports",
        "dup-ports",
        "no-labels",
        "failure-mode",
        "typo",
        "app-protocol",
        "priority-type",
        "no-pool-ref",
        "no-targets",
        "zero-weight",
        "criticality",
    ],
)
def test_invalid_objects_are_rejected(kind: str, change: Any, problem: str) -> None:
    obj = copy.deepcopy(example(kind)[0])
    change(obj)
    errors = validate(obj, CRDS)
    assert any(problem in e for e in errors), errors


def test_the_cel_rules_are_declared() -> None:
    text = (ROOT / "config/crd/inference.networking.x-k8s.io_inferencemodelrewrites.yaml").read_text()
    assert "self.all(t, has(t.weight)) || self.all(t, !has(t.weight))" in text
    pool = (ROOT / "config/crd/inference.networking.k8s.io_inferencepools.yaml").read_text()
    assert "self.kind != 'Service' || has(self.port)" in pool


def test_examples_mean_what_the_controllers_read() -> None:
    pools = {p["metadata"]["name"]: parse_pool(p) for p in example("InferencePool")}
    assert pools["vllm-llama3"].label_selector() == "app=vllm-llama3"
    assert pools["vllm-llama3-dp"].target_ports == (8000, 8001)
    assert objective_priorities(example("InferenceObjective"), "vllm-llama3") == {"chat": 10, "batch": -1}
    (canary, catch_all) = rewrite_rules(example("InferenceModelRewrite"), "vllm-llama3")
    assert [(t.model, t.weight) for t in canary.targets] == [("llama3-v1", 90), ("llama3-v2", 10)]
    assert catch_all.models == frozenset()
    legacy = legacy_models(example("InferenceModel"), "vllm-llama3")
    assert legacy.priorities == {"food-review": 1}
    assert legacy.model_objectives == {"food-review": "food-review"}


def test_jsonschema_is_used_when_installed() -> None:
    if jsonschema is None:
        pytest.skip("jsonschema is not installed: only the built-in structural checker ran")
    bad = copy.deepcopy(example("InferencePool")[0])
    bad["spec"]["targetPorts"] = [{"number": 70000}]
    assert any(e.startswith("jsonschema:") for e in validate(bad, CRDS))


# -- kustomize --------------------------------------------------------------------------------------


def render(directory: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run([KUBECTL, "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


MODELS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "V1CustomResourceDefinition",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (Debian package kubernetes-client): kustomize rendering skipped")
    return {d: render(d) for d in KUSTOMIZATIONS}


def of(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


@needs_kubectl
async def test_rendered_manifests_parse_into_client_models(rendered: dict[str, list[dict[str, Any]]]) -> None:
    async with client.ApiClient() as api:
        for directory, objs in rendered.items():
            for obj in objs:
                key = (obj["apiVersion"], obj["kind"])
                if key in MODELS:
                    model = api.deserialize(SimpleNamespace(data=json.dumps(obj)), MODELS[key])
                    assert model.metadata.name == obj["metadata"]["name"]
                    # a round trip keeps every field: nothing was misspelt or misplaced
                    assert api.sanitize_for_serialization(model) == obj, (directory, obj["metadata"]["name"])
                elif obj["apiVersion"].startswith("inference.networking"):
                    assert validate(obj, CRDS) == []
                else:
                    assert key in {
                        ("gateway.networking.k8s.io/v1", "Gateway"),
                        ("gateway.networking.k8s.io/v1", "GatewayClass"),
                        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
                        ("networking.istio.io/v1", "DestinationRule"),
                    }, key


@needs_kubectl
def test_base_is_least_privilege_and_serves_the_three_ports(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["deploy/base"]
    (role,) = of(objs, "Role")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"list", "watch"}  # read-only; no status writes
    assert not any("/status" in r for rule in role["rules"] for r in rule["resources"])
    (service,) = of(objs, "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {9002, 9003, 9090}
    (deployment,) = of(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--pool-name=vllm-llama3" in container["args"]
    assert container["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert container["image"] == "igw:0.1.0"
    assert (
        service["spec"]["selector"]
        == deployment["spec"]["template"]["metadata"]["labels"] | service["spec"]["selector"]
    )
    (pool,) = [p for p in example("InferencePool") if p["metadata"]["name"] == "vllm-llama3"]
    assert pool["spec"]["endpointPickerRef"]["name"] == service["metadata"]["name"]


@needs_kubectl
def test_overlays(rendered: dict[str, list[dict[str, Any]]]) -> None:
    le = rendered["deploy/overlays/leader-election"]
    (deployment,) = of(le, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert "--ha-enable-leader-election" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # a follower is never Ready
    lease_rules = [r for role in of(le, "Role") for r in role["rules"] if "leases" in r["resources"]]
    assert {v for r in lease_rules for v in r["verbs"]} == {"create", "get", "update"}

    sel = rendered["deploy/overlays/selector"]
    (deployment,) = of(sel, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--endpoint-selector=app=vllm-llama3" in args
    assert not any(a.startswith("--pool-name") for a in args)
    (role,) = of(sel, "Role")
    assert [r["resources"] for r in role["rules"]] == [["pods"]]


@needs_kubectl
def test_envoy_standalone_uses_the_generated_bootstrap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["deploy/overlays/envoy-standalone"]
    (config_map,) = of(objs, "ConfigMap")
    assert config_map["metadata"]["name"].startswith("envoy-bootstrap-")  # hashed: a change rolls the Pods
    (deployment,) = of(objs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["epp", "envoy"]
    assert spec["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    epp = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "igw_epp")
    address = epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": 9002}
    assert bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 8081


@needs_kubectl
def test_gateway_examples_route_to_the_pool(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for directory in ("deploy/gateways/envoy-gateway", "deploy/gateways/istio"):
        (route,) = of(rendered[directory], "HTTPRoute")
        (backend,) = route["spec"]["rules"][0]["backendRefs"]
        assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "vllm-llama3"}
        (gateway,) = of(rendered[directory], "Gateway")
        assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]


@needs_kubectl
def test_manifest_flags_parse_with_the_cli(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from igw.cli import build_parser

    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    if "--pool-name" not in run._option_string_actions:
        pytest.skip("the Kubernetes-mode flags are not in igw run yet")
    for directory in ("deploy/base", "deploy/overlays/leader-election", "deploy/overlays/selector"):
        (deployment,) = of(rendered[directory], "Deployment")
        parser.parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


# -- the Envoy bootstrap ------------------------------------------------------------------------------


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_envoy_bootstrap", ROOT / "deploy" / "render_envoy_bootstrap.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_bootstrap_is_current() -> None:
    renderer = load_renderer()
    assert renderer.main(["--check"]) == 0, "run: python deploy/render_envoy_bootstrap.py"


def test_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    from igw.app.envoy import envoy_binary

    try:
        binary = envoy_binary()
    except Exception as exc:  # any reason Envoy is unavailable means skip
        pytest.skip(f"no Envoy binary: {exc}")
    if not Path(binary).exists() and shutil.which(binary) is None:
        pytest.skip("no Envoy binary")
    path = ROOT / "deploy/overlays/envoy-standalone/envoy.yaml"
    result = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
