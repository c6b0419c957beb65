"""Kubernetes mode end to end against the fake API server: readiness, objectives per request, HA, auth."""

from __future__ import annotations

import asyncio
import random
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
import pytest
import yaml
from conftest import FAST, eventually
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_fakeapi import OBJECTIVES, PODS, POOLS, REWRITES, FakeKube, objective, pod, pool, rewrite, rule
from kubernetes_asyncio import client

from igw.api.context import RequestContext
from igw.api.errors import IgwError
from igw.app.kubernetes import KubernetesEpp, KubernetesSettings, run_kubernetes
from igw.config.pool import ConfigError
from igw.config.settings import EppSettings, ServerSettings
from igw.controllers.kube import ClientSettings, connect, load_configuration, pod_namespace
from igw.datalayer.rewrites import RewriteStore

# No scraping (the pods' loopback addresses serve nothing); scheduling still works on stale data.
NO_SCRAPE = (
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\ndataLayer:\n  sources: []\n"
)
EPP = EppSettings(server=ServerSettings(grpc_port=0, health_port=0, metrics_port=0, drain_seconds=0.1))
POOL_MODE = KubernetesSettings(pool_name="pool", pool_namespace="default", watch=FAST)


def k8s_epp(api: client.ApiClient, settings: KubernetesSettings = POOL_MODE) -> KubernetesEpp:
    return KubernetesEpp(settings, EPP, config_text=NO_SCRAPE, config_source="test", api=api, environ={})


async def health(port: int, service: str = "readiness") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def request(headers: dict[str, str] | None = None, model: str = "m") -> tuple[RequestContext, bytes]:
    ctx = RequestContext(request_id="r", path="/v1/completions", headers=headers or {}, started_at=time.monotonic())
    return ctx, orjson.dumps({"model": model, "prompt": "hi"})


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (KubernetesSettings(), "exactly one of --pool-name or --endpoint-selector"),
        (KubernetesSettings(pool_name="p", endpoint_selector="a=b"), "exactly one"),
        (KubernetesSettings(endpoint_selector="a=b"), "give 1 to 8 ports"),
        (KubernetesSettings(endpoint_selector="a", endpoint_target_ports=(1,)), "not key=value"),
        (KubernetesSettings(endpoint_selector="a=b", endpoint_target_ports=(1, 1)), "unique"),
        (KubernetesSettings(endpoint_selector="a=b", endpoint_target_ports=(70000,)), "1-65535"),
        (KubernetesSettings(pool_name="p", endpoint_target_ports=(80,)), "goes with --endpoint-selector"),
        (KubernetesSettings(pool_name="p", pool_group="example.com"), "--pool-group"),
        (KubernetesSettings(pool_name="p", leader_election=True, renew_deadline_s=20), "leader election"),
    ],
    ids=["none", "both", "no-ports", "bad-selector", "dup-ports", "port-range", "ports-with-pool", "group", "lease"],
)
def test_settings_validation(settings: KubernetesSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings.validate()


def test_names_from_the_environment(tmp_path: Path) -> None:
    s = KubernetesSettings(endpoint_selector="app=vllm", endpoint_target_ports=(8000,))
    env = {"POD_NAME": "my-epp-7d9f8b6c5-x2kqz", "NAMESPACE": "serving"}
    assert s.epp_name(env) == "my-epp"
    assert s.namespace(env) == "serving"
    assert s.namespace({}) in ("default", pod_namespace({}))
    lease = s.lease_settings("serving", env)
    assert lease.name == "igw-epp-my-epp"
    assert lease.identity.startswith("my-epp-7d9f8b6c5-x2kqz_")
    (tmp_path / "namespace").write_text("from-sa\n")
    assert pod_namespace({}, sa_dir=str(tmp_path)) == "from-sa"
    assert KubernetesSettings(pool_name="p").lease_settings("ns", {}).name == "igw-epp-p"


# -- pool mode --------------------------------------------------------------------------------------


@pytest.fixture
async def running(kube: FakeKube, api: client.ApiClient) -> AsyncIterator[KubernetesEpp]:
    async with k8s_epp(api) as k8s:
        yield k8s


async def test_readiness_follows_the_pool(kube: FakeKube, running: KubernetesEpp) -> None:
    port = running.epp.health_port
    await eventually(lambda: running.pool is not None and running.pool.reflector.synced, what="the pool list")
    assert await health(port) == NOT_SERVING  # no InferencePool yet
    assert await health(port, "liveness") == SERVING
    kube.create(POOLS, pool("pool", ports=[1]))
    kube.create(PODS, pod("a", "127.0.0.2"))
    await eventually(lambda: running.epp.health.ready, what="ready")
    assert await health(port) == SERVING
    assert [s.address for s in running.epp.store.endpoints()] == ["127.0.0.2:1"]
    kube.delete(POOLS, "pool")
    await eventually(lambda: not running.epp.health.ready, what="not ready without a pool")
    assert await health(port, "envoy.service.ext_proc.v3.ExternalProcessor") == NOT_SERVING


async def test_an_objective_change_applies_to_the_next_request(kube: FakeKube, running: KubernetesEpp) -> None:
    kube.create(POOLS, pool("pool", ports=[1]))
    kube.create(PODS, pod("a", "127.0.0.2"))
    kube.create(OBJECTIVES, objective("chat", 10))
    await eventually(lambda: running.epp.health.ready and running.epp.objectives.known("chat"), what="synced")

    async def priority_of_next_request() -> int:
        ctx, body = request({"x-gateway-inference-objective": "chat"})
        try:
            await running.epp.director.handle_request(ctx, body)
        except IgwError:
            pass  # only the objective stage matters here
        assert ctx.request is not None
        return ctx.request.priority

    assert await priority_of_next_request() == 10
    kube.patch(OBJECTIVES, "chat", lambda o: o["spec"].update(priority=-2))
    await eventually(lambda: running.epp.objectives.priority("chat") == -2, what="the update")
    assert await priority_of_next_request() == -2
    kube.delete(OBJECTIVES, "chat")
    await eventually(lambda: not running.epp.objectives.known("chat"), what="the deletion")
    assert await priority_of_next_request() == 0


async def test_rewrites_reach_the_store_the_director_reads(kube: FakeKube, running: KubernetesEpp) -> None:
    store = running.rewrites
    assert isinstance(store, RewriteStore)
    store._rng = random.Random(5)
    kube.create(REWRITES, rewrite("split", [rule(["m"], [("m-a", 3), ("m-b", 1)])]))
    await eventually(lambda: store.rule_for("m") is not None, what="the rule")
    counts = Counter(store.rewrite("m") for _ in range(8000))
    assert abs(counts["m-b"] / 8000 - 0.25) < 0.025


async def test_selector_mode_needs_no_crds(kube: FakeKube, api: client.ApiClient) -> None:
    for r in (POOLS, OBJECTIVES, REWRITES):
        kube.uninstall(r)
    kube.create(PODS, pod("a", "127.0.0.3", labels={"app": "x"}))
    settings = KubernetesSettings(
        endpoint_selector="app=x", endpoint_target_ports=(1, 2), pool_namespace="default", watch=FAST
    )
    async with k8s_epp(api, settings) as k8s:
        await eventually(lambda: k8s.epp.health.ready, what="ready")
        assert [s.address for s in k8s.epp.store.endpoints()] == ["127.0.0.3:1", "127.0.0.3:2"]
        assert k8s.objectives is None
    assert {path.split("/")[-1] for _, path, _ in kube.requests} == {"pods"}


# -- leader election --------------------------------------------------------------------------------


async def test_active_passive_readiness_follows_leadership(kube: FakeKube, api: client.ApiClient) -> None:
    kube.create(POOLS, pool("pool", ports=[1]))
    kube.create(PODS, pod("a", "127.0.0.2"))

    def replica(name: str) -> KubernetesEpp:
        settings = KubernetesSettings(
            pool_name="pool", pool_namespace="default", watch=FAST, leader_election=True, identity=name,
            lease_duration_s=1.0, renew_deadline_s=0.5, retry_period_s=0.05,
        )  # fmt: skip
        return k8s_epp(api, settings)

    a, b = replica("a"), replica("b")
    await a.start()
    await b.start()
    try:
        await eventually(lambda: a.epp.health.ready or b.epp.health.ready, what="one ready replica")
        await asyncio.sleep(0.2)
        assert a.epp.health.ready != b.epp.health.ready
        leader, follower = (a, b) if a.epp.health.ready else (b, a)
        # the follower keeps syncing: its store is as full as the leader's
        assert follower.synced
        assert [s.address for s in follower.epp.store.endpoints()] == ["127.0.0.2:1"]
        assert await health(follower.epp.health_port) == NOT_SERVING
        await leader.stop()
        await eventually(lambda: follower.epp.health.ready, what="the follower taking over")
        assert await health(follower.epp.health_port) == SERVING
    finally:
        await a.stop()
        await b.stop()


# -- authentication ---------------------------------------------------------------------------------


async def test_kubeconfig_with_a_bearer_token(tmp_path: Path) -> None:
    async with FakeKube(token="s3cret") as kube:
        kube.create(POOLS, pool("pool", ports=[1]))
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "test",
                "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
                "users": [{"name": "epp", "user": {"token": "s3cret"}}],
                "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "epp"}}],
            })
        )  # fmt: skip
        settings = KubernetesSettings(
            pool_name="pool", pool_namespace="default", kubeconfig=str(kubeconfig), watch=FAST
        )
        async with KubernetesEpp(settings, EPP, config_text=NO_SCRAPE, environ={}) as k8s:
            await eventually(lambda: k8s.epp.health.ready, what="ready through the kubeconfig")
        assert kube.count("list", POOLS) >= 1
        bad = tmp_path / "bad"
        bad.write_text(kubeconfig.read_text().replace("s3cret", "wrong"))
        api = await connect(ClientSettings(kubeconfig=str(bad)))
        try:
            with pytest.raises(client.ApiException) as info:
                await client.CoreV1Api(api).list_namespaced_pod("default")
            assert info.value.status == 401
        finally:
            await api.close()


async def test_run_kubernetes_serves_until_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with FakeKube() as kube:
        kube.create(POOLS, pool("pool", ports=[1]))
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{"name": "k", "cluster": {"server": kube.url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            })
        )  # fmt: skip
        settings = KubernetesSettings(
            pool_name="pool", pool_namespace="default", kubeconfig=str(kubeconfig), watch=FAST
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_kubernetes(settings, EPP, config_text=NO_SCRAPE, stop=stop))
        await eventually(lambda: kube.watch_count(POOLS) == 1, what="watching the pool")
        stop.set()
        await asyncio.wait_for(task, 5)
    assert "endpoints from InferencePool default/pool" in capsys.readouterr().out


async def test_a_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kubeconfig"):
        await load_configuration(ClientSettings(kubeconfig=str(tmp_path / "nope")), environ={})


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the API server's) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    return cert, key


async def test_in_cluster_service_account_over_tls(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("pod-token")
    (sa / "namespace").write_text("serving")
    shutil.copy(cert, sa / "ca.crt")
    async with FakeKube(token="pod-token", ssl_context=tls) as kube:
        kube.create(PODS, pod("a", "10.0.0.1"), namespace="serving")
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(kube.port)}
        configuration = await load_configuration(ClientSettings(), environ=env, sa_dir=str(sa))
        assert configuration.host == kube.url
        api = await connect(ClientSettings(), environ=env, sa_dir=str(sa))
        try:
            namespace = pod_namespace(env, sa_dir=str(sa))
            assert namespace == "serving"
            pods = await client.CoreV1Api(api).list_namespaced_pod(namespace)
            assert [p.metadata.name for p in pods.items] == ["a"]
        finally:
            await api.close()
        with pytest.raises(ConfigError, match="in-cluster"):
            await load_configuration(ClientSettings(), environ=env, sa_dir=str(tmp_path / "missing"))


async def test_readiness_stays_through_a_pool_selector_change(kube: FakeKube, api: client.ApiClient) -> None:
    async with k8s_epp(api) as k8s:
        kube.create(POOLS, pool("pool", selector={"app": "a"}, ports=[1]))
        kube.create(PODS, pod("a", "127.0.0.2", labels={"app": "a"}))
        kube.create(PODS, pod("b", "127.0.0.3", labels={"app": "b"}))
        await eventually(lambda: k8s.epp.health.ready, what="ready")
        kube.patch(POOLS, "pool", lambda o: o["spec"]["selector"].__setitem__("matchLabels", {"app": "b"}))
        seen_unready = False
        deadline = time.monotonic() + 3.0
        while [s.address for s in k8s.epp.store.endpoints()] != ["127.0.0.3:1"]:
            seen_unready = seen_unready or not k8s.epp.health.ready
            assert time.monotonic() < deadline, "the new selector's pods never arrived"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        assert k8s.epp.health.ready, "readiness must come back (and stay) after a selector change"
        assert not seen_unready, "the old endpoints are kept, so readiness does not blink"
