"""MetricsCollector against real aiohttp servers on loopback: scrapes, failures, staleness, pool changes."""

from __future__ import annotations

import asyncio
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from igw.api.types import Endpoint, EndpointState, Engine, InferenceRequest
from igw.config.settings import DataLayerSettings, EppSettings
from igw.datalayer.collector import MetricsCollector
from igw.datalayer.engines import EngineConfig
from igw.datalayer.extractors import CoreMetricsExtractor
from igw.datalayer.sources import MetricsDataSource
from igw.datalayer.store import EndpointStore
from igw.framework.scheduling import SchedulerProfile, WeightedScorer
from igw.requestcontrol.director import Availability, available
from igw.scheduling.plugins.availability_filter import AvailabilityFilter
from igw.scheduling.plugins.max_score_picker import MaxScorePicker
from igw.scheduling.plugins.queue_scorer import QueueScorer
from igw.scheduling.scheduler import Scheduler

INTERVAL = 0.02
REQ = InferenceRequest(request_id="r", model="m", path="/v1/completions", body_size=1)


def vllm_text(waiting: float, running: float = 1.0, kv: float = 0.25) -> str:
    return (
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}\n'
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {kv}\n'
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="2048"} 1.0\n'
    )


SGLANG_TEXT = (
    'sglang:num_queue_reqs{model_name="m"} 7\nsglang:num_running_reqs{model_name="m"} 2\nsglang:token_usage 0.5\n'
)
TRTLLM_TEXT = "trtllm_num_requests_waiting 4\ntrtllm_num_requests_running 3\ntrtllm_kv_cache_utilization 0.75\n"
TRITON_TEXT = (
    'nv_trt_llm_request_metrics{request_type="waiting",model="t",version="1"} 6\n'
    'nv_trt_llm_request_metrics{request_type="scheduled",model="t",version="1"} 5\n'
    'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="t",version="1"} 0.125\n'
)


class MetricsServer:
    """An aiohttp server on 127.0.0.1 (port 0) serving ``text`` at ``path``; counts hits."""

    def __init__(self, text: str, path: str = "/metrics", tls: ssl.SSLContext | None = None) -> None:
        self.text = text
        self.path = path
        self.tls = tls
        self.status = 200
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def endpoint(self, engine: str | None = Engine.VLLM, **labels: str) -> Endpoint:
        return Endpoint(self.address, "127.0.0.1", self.port, engine=engine, labels=tuple(labels.items()))

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(text=self.text, status=self.status, content_type="text/plain")

    async def start(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., asyncio.Future[MetricsServer]]]:
    started: list[MetricsServer] = []

    async def make(text: str, path: str = "/metrics", tls: ssl.SSLContext | None = None) -> MetricsServer:
        srv = await MetricsServer(text, path, tls).start()
        started.append(srv)
        return srv

    yield make  # type: ignore[misc]
    for srv in started:
        await srv.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def state_of(store: EndpointStore, address: str) -> EndpointState:
    state = store.get(address)
    assert state is not None
    return state


@pytest.fixture
async def collectors() -> AsyncIterator[list[MetricsCollector]]:
    running: list[MetricsCollector] = []
    yield running
    for c in running:
        await c.stop()


async def start_collector(
    store: EndpointStore,
    running: list[MetricsCollector],
    clock: Callable[[], float] = time.monotonic,
    *,
    source: MetricsDataSource | None = None,
    extractor: CoreMetricsExtractor | None = None,
    enabled: bool = True,
    **kw: object,
) -> MetricsCollector:
    settings = DataLayerSettings(scrape_interval=INTERVAL, scrape_timeout=0.5, **kw)  # type: ignore[arg-type]
    collector = MetricsCollector(store, settings, clock=clock, source=source, extractor=extractor, enabled=enabled)
    await collector.start()
    running.append(collector)
    return collector


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "path", "text", "expected"),
    [
        (Engine.VLLM, "/metrics", vllm_text(7, 3, 0.5), (7.0, 3.0, 0.5, 16, 2048)),
        (Engine.SGLANG, "/metrics", SGLANG_TEXT, (7.0, 2.0, 0.5, None, None)),
        (Engine.TRTLLM_SERVE, "/prometheus/metrics", TRTLLM_TEXT, (4.0, 3.0, 0.75, None, None)),
        (Engine.TRITON_TENSORRT_LLM, "/metrics", TRITON_TEXT, (6.0, 5.0, 0.125, None, None)),
    ],
    ids=["vllm", "sglang", "trtllm-serve-path", "triton"],
)
async def test_metrics_arrive_in_the_store(
    servers, collectors, engine: Engine, path: str, text: str, expected: tuple[object, ...]
) -> None:
    srv = await servers(text, path)
    store = EndpointStore()
    store.set_endpoints([srv.endpoint(engine)])
    t0 = time.monotonic()
    await start_collector(store, collectors)
    state = state_of(store, srv.address)
    await wait_until(lambda: state.metrics.scraped_at > 0, timeout=10 * INTERVAL + 1.0)
    m = state.metrics
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == expected
    assert m.scraped_at >= t0
    assert (state.failures, state.last_error) == (0, None)
    # the scraper keeps going: changed numbers show up within a few intervals
    waiting = f" {int(expected[0])}\n"  # type: ignore[call-overload]
    assert waiting in text
    srv.text = text.replace(waiting, " 9\n", 1)
    await wait_until(lambda: state.metrics.waiting == 9.0, timeout=10 * INTERVAL + 1.0)


async def test_metrics_path_override(servers, collectors) -> None:
    srv = await servers(vllm_text(2), "/custom/metrics")
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    await start_collector(store, collectors, metrics_path="/custom/metrics")
    await wait_until(lambda: state_of(store, srv.address).metrics.waiting == 2.0)


async def test_scrape_resets_dispatched_since_scrape(servers, collectors) -> None:
    srv = await servers(vllm_text(1))
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    for _ in range(5):
        store.request_started(srv.address)
    state = state_of(store, srv.address)
    assert state.dispatched_since_scrape == 5
    await start_collector(store, collectors)
    await wait_until(lambda: state.dispatched_since_scrape == 0)
    assert state.inflight == 5


@pytest.mark.parametrize("failure", ["closed", "http-500", "http-404"], ids=["server-closed", "http-500", "http-404"])
async def test_failing_endpoint_is_avoided(servers, collectors, failure: str) -> None:
    good = await servers(vllm_text(5))  # busier, but healthy
    bad = await servers(vllm_text(0))
    store = EndpointStore()
    store.set_endpoints([good.endpoint(), bad.endpoint()])
    settings = EppSettings(datalayer=DataLayerSettings(scrape_interval=INTERVAL))
    await start_collector(store, collectors)
    good_state, bad_state = state_of(store, good.address), state_of(store, bad.address)
    await wait_until(lambda: good_state.metrics.scraped_at > 0 and bad_state.metrics.scraped_at > 0)

    rule = Availability(settings.datalayer.staleness_threshold, settings.datalayer.max_consecutive_failures)
    scheduler = Scheduler(SchedulerProfile("p", (), (WeightedScorer(QueueScorer(), 1.0),), MaxScorePicker()))
    assert scheduler.schedule(REQ, available(store.endpoints(), rule)).endpoints == [
        bad_state
    ]  # idle wins while healthy

    if failure == "closed":
        await bad.close()
    elif failure == "http-500":
        bad.status = 500
    else:
        bad.status = 404
    limit = settings.datalayer.max_consecutive_failures
    await wait_until(lambda: bad_state.failures >= limit + 2, timeout=3.0)
    assert bad_state.last_error
    if failure.startswith("http"):
        assert failure[-3:] in bad_state.last_error
    assert bad_state.metrics.waiting == 0.0  # the old snapshot stays in place
    assert good_state.failures == 0

    flt = AvailabilityFilter(max_consecutive_failures=limit)
    assert flt.filter(REQ, store.endpoints()) == [good_state]
    for _ in range(20):
        assert scheduler.schedule(REQ, available(store.endpoints(), rule)).endpoints == [good_state]


async def test_recovered_endpoint_is_used_again(servers, collectors) -> None:
    srv = await servers(vllm_text(0))
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    srv.status = 503
    await start_collector(store, collectors)
    state = state_of(store, srv.address)
    await wait_until(lambda: state.failures >= 3)
    assert state.metrics.scraped_at == 0.0
    srv.status = 200
    await wait_until(lambda: state.failures == 0 and state.metrics.scraped_at > 0)
    assert state.last_error is None


async def test_stale_snapshot_is_detected_with_an_injected_clock(servers, collectors) -> None:
    now = [500.0]

    def clock() -> float:
        return now[0]

    fresh_srv = await servers(vllm_text(9))
    stale_srv = await servers(vllm_text(0))
    store = EndpointStore(clock=clock)
    store.set_endpoints([fresh_srv.endpoint(), stale_srv.endpoint()])
    await start_collector(store, collectors, clock=clock, max_consecutive_failures=10**6)
    fresh, stale = state_of(store, fresh_srv.address), state_of(store, stale_srv.address)
    await wait_until(lambda: fresh.metrics.scraped_at == 500.0 and stale.metrics.scraped_at == 500.0)

    stale_srv.status = 500  # the stale endpoint stops producing new snapshots
    await wait_until(lambda: stale.failures >= 1)
    now[0] = 503.0
    await wait_until(lambda: fresh.metrics.scraped_at == 503.0)
    assert stale.metrics.scraped_at == 500.0
    assert stale.age(clock()) == 3.0
    assert fresh.age(clock()) == 0.0

    flt = AvailabilityFilter(staleness_threshold=2.0, max_consecutive_failures=10**6, clock=clock)
    assert flt.available(fresh, clock())
    assert not flt.available(stale, clock())
    profile = SchedulerProfile("p", (flt,), (), MaxScorePicker(rng=random.Random(3)))
    for _ in range(20):
        assert Scheduler(profile).schedule(REQ, store.endpoints()).endpoints == [fresh]


async def test_pool_changes_start_and_stop_scrapers(servers, collectors) -> None:
    a = await servers(vllm_text(1))
    b = await servers(vllm_text(2))
    store = EndpointStore()
    store.set_endpoints([a.endpoint()])
    await start_collector(store, collectors)
    await wait_until(lambda: a.hits >= 2)
    assert b.hits == 0

    store.set_endpoints([a.endpoint(), b.endpoint()])
    await wait_until(lambda: state_of(store, b.address).metrics.waiting == 2.0)

    store.set_endpoints([b.endpoint()])
    await asyncio.sleep(3 * INTERVAL)  # let an in-flight scrape of a finish
    hits_a, hits_b = a.hits, b.hits
    await asyncio.sleep(6 * INTERVAL)
    assert a.hits == hits_a
    assert b.hits > hits_b

    store.set_endpoints([])
    await asyncio.sleep(3 * INTERVAL)
    hits_b = b.hits
    await asyncio.sleep(6 * INTERVAL)
    assert b.hits == hits_b


async def test_stop_ends_every_scraper(servers, collectors) -> None:
    a = await servers(vllm_text(1))
    store = EndpointStore()
    store.set_endpoints([a.endpoint()])
    collector = await start_collector(store, collectors)
    await wait_until(lambda: a.hits >= 2)
    await collector.stop()
    await asyncio.sleep(2 * INTERVAL)
    hits = a.hits
    store.set_endpoints([a.endpoint()])  # no collector reacts after stop
    await asyncio.sleep(6 * INTERVAL)
    assert a.hits == hits


async def test_engine_change_at_same_address_restarts_the_scraper(servers, collectors) -> None:
    srv = await servers(SGLANG_TEXT)
    store = EndpointStore()
    store.set_endpoints([srv.endpoint(Engine.VLLM)])
    await start_collector(store, collectors)
    await wait_until(lambda: state_of(store, srv.address).metrics.scraped_at > 0)
    assert state_of(store, srv.address).metrics.waiting == 0.0  # vLLM names: nothing matches
    store.set_endpoints([srv.endpoint(Engine.SGLANG)])
    await wait_until(lambda: state_of(store, srv.address).metrics.waiting == 7.0, timeout=20 * INTERVAL)


# --------------------------------------------------------------------------------------------
# The data-layer plugins: engine selection, user engines, path, https, disabled collection
# --------------------------------------------------------------------------------------------

ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


async def test_engine_label_selects_the_names(servers, collectors) -> None:
    srv = await servers(SGLANG_TEXT)
    store = EndpointStore()
    store.set_endpoints([srv.endpoint(None, **{ENGINE_LABEL: "sglang"})])
    await start_collector(store, collectors)
    await wait_until(lambda: state_of(store, srv.address).metrics.waiting == 7.0)


async def test_default_engine_applies_to_undeclared_and_unknown_engines(servers, collectors) -> None:
    a = await servers(SGLANG_TEXT)
    b = await servers(SGLANG_TEXT)
    store = EndpointStore()
    store.set_endpoints([a.endpoint(None), b.endpoint("lmdeploy")])
    await start_collector(store, collectors, extractor=CoreMetricsExtractor(default_engine="sglang"))
    await wait_until(lambda: all(state_of(store, s.address).metrics.waiting == 7.0 for s in (a, b)))


async def test_user_engine_config(servers, collectors) -> None:
    text = 'tgi_queue_size 5\ntgi_batch_current_size{shard="0"} 2\ntgi_batch_current_size{shard="1"} 3\n'
    srv = await servers(text)
    tgi = EngineConfig.from_specs(
        "tgi", queued_requests_spec="tgi_queue_size", running_requests_spec="tgi_batch_current_size{shard=1}"
    )
    store = EndpointStore()
    store.set_endpoints([srv.endpoint("tgi")])
    await start_collector(store, collectors, extractor=CoreMetricsExtractor(engine_configs=[tgi]))
    state = state_of(store, srv.address)
    await wait_until(lambda: state.metrics.scraped_at > 0)
    assert (state.metrics.waiting, state.metrics.running) == (5.0, 3.0)


async def test_source_path_wins_over_the_engine_path(servers, collectors) -> None:
    srv = await servers(TRTLLM_TEXT, "/stats")
    store = EndpointStore()
    store.set_endpoints([srv.endpoint(Engine.TRTLLM_SERVE)])
    await start_collector(store, collectors, source=MetricsDataSource(path="/stats"), metrics_path="/ignored")
    await wait_until(lambda: state_of(store, srv.address).metrics.waiting == 4.0)


async def test_lora_info_arrives_in_the_store(servers, collectors) -> None:
    lora = (
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 100\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a, b",waiting_lora_adapters="c"} 200\n'
    )
    srv = await servers(vllm_text(1) + lora)
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    await start_collector(store, collectors)
    state = state_of(store, srv.address)
    await wait_until(lambda: state.metrics.scraped_at > 0)
    m = state.metrics
    assert (m.max_lora, m.running_adapters, m.waiting_adapters) == (2, frozenset("ab"), frozenset("c"))


async def test_disabled_collection_scrapes_nothing(servers, collectors) -> None:
    srv = await servers(vllm_text(1))
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    await start_collector(store, collectors, enabled=False)
    store.set_endpoints([srv.endpoint(), srv.endpoint(Engine.SGLANG)])
    await asyncio.sleep(5 * INTERVAL)
    assert srv.hits == 0
    assert state_of(store, srv.address).metrics.scraped_at == 0.0


@pytest.fixture(scope="module")
def tls_server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make a self-signed certificate")
    folder: Path = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


async def test_https_scrape(servers, collectors, tls_server_context: ssl.SSLContext) -> None:
    srv = await servers(vllm_text(6), tls=tls_server_context)
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    await start_collector(store, collectors, source=MetricsDataSource(scheme="https"))
    await wait_until(lambda: state_of(store, srv.address).metrics.waiting == 6.0)


async def test_https_with_verification_fails_on_a_self_signed_certificate(
    servers, collectors, tls_server_context: ssl.SSLContext
) -> None:
    srv = await servers(vllm_text(6), tls=tls_server_context)
    store = EndpointStore()
    store.set_endpoints([srv.endpoint()])
    await start_collector(store, collectors, source=MetricsDataSource(scheme="https", insecure_skip_verify=False))
    state = state_of(store, srv.address)
    await wait_until(lambda: state.failures >= 2)
    assert "CERTIFICATE_VERIFY_FAILED" in (state.last_error or "")
    assert state.metrics.scraped_at == 0.0
