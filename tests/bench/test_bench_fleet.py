"""The benchmark's fleet: the simulator's command line, counters read from a real /metrics, deltas."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from igw_bench.fleet import SimFleetSpec, counter_delta, parse_counters, scrape_counters, start_fleet
from igw_bench.procs import free_ports
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet
from igw_sim.metrics import MetricsStyle

FAST = EngineConfig(block_size=4, kv_blocks=256, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=1)
PROMPT = " the" * 40


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --------------------------------------------------------------------------------------------
# The simulator's command line


def test_argv_runs_the_simulator_on_loopback_with_every_setting() -> None:
    spec = SimFleetSpec(servers=2, profile="p", kv_blocks=128, time_dilation=5.0, model="mm",
                        loras=("a", "b"), max_loras=1, extra_args=("--seed", "3"))  # fmt: skip
    argv = spec.argv([7001, 7002])
    assert argv[:3] == [sys.executable, "-m", "igw_sim"]
    assert _after(argv, "--ports") == "7001,7002"
    assert _after(argv, "--host") == "127.0.0.1"
    assert _after(argv, "--model") == "mm"
    assert _after(argv, "--profile") == "p"
    assert _after(argv, "--time-dilation") == "5"
    assert _after(argv, "--kv-blocks") == "128"
    start = argv.index("--lora-modules") + 1
    assert argv[start : start + 2] == ["a=/dev/null", "b=/dev/null"]
    assert _after(argv, "--max-loras") == "1"
    assert argv[-2:] == ["--seed", "3"]


def test_argv_leaves_out_what_is_not_set() -> None:
    argv = SimFleetSpec(kv_blocks=None, time_dilation=0.5).argv([1])
    assert "--kv-blocks" not in argv
    assert "--lora-modules" not in argv
    assert "--max-loras" not in argv
    assert _after(argv, "--time-dilation") == "0.5"


def test_kv_tokens_is_the_whole_fleets_cache_in_tokens() -> None:
    assert SimFleetSpec(servers=4, kv_blocks=100).kv_tokens == 4 * 100 * 16
    assert SimFleetSpec(kv_blocks=None).kv_tokens is None


def test_describe_names_the_fleet() -> None:
    described = SimFleetSpec(servers=3, kv_blocks=64, loras=("x",)).describe()
    assert described["servers"] == 3
    assert described["kv_blocks"] == 64
    assert described["loras"] == ["x"]


# --------------------------------------------------------------------------------------------
# parse_counters


async def _two_requests_then_metrics(style: MetricsStyle) -> tuple[str, list[dict[str, object]]]:
    async with SimFleet(ports=[0], engine=FAST, metrics_style=style) as fleet, aiohttp.ClientSession() as http:
        base = f"http://{fleet.addresses[0]}"
        usages = []
        for _ in range(2):
            body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3}
            async with http.post(f"{base}/v1/completions", json=body) as resp:
                assert resp.status == 200
                usages.append((await resp.json())["usage"])
        async with http.get(f"{base}/metrics") as resp:
            return await resp.text(), usages


@pytest.mark.timeout(30)
async def test_parse_counters_reads_the_simulators_vllm_metrics() -> None:
    text, usages = await _two_requests_then_metrics("vllm")

    counters = parse_counters(text)

    assert counters["requests"] == 2
    assert counters["prompt_tokens"] == 80
    assert counters["generation_tokens"] == 6
    assert counters["queries"] == 80
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)  # type: ignore[index]
    assert cached > 0
    assert counters["hits"] == cached
    assert counters["preemptions"] == 0


@pytest.mark.timeout(30)
async def test_parse_counters_reads_sglang_names_and_leaves_out_missing_ones() -> None:
    text, _ = await _two_requests_then_metrics("sglang")

    counters = parse_counters(text)

    assert counters["requests"] == 2
    assert counters["prompt_tokens"] == 80
    assert counters["generation_tokens"] == 6
    assert "preemptions" not in counters


def test_parse_counters_sums_over_labels_and_ignores_created_and_other_samples() -> None:
    text = """\
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="m"} 3.0
vllm:request_success_total{finished_reason="length",model_name="m"} 4.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{finished_reason="stop",model_name="m"} 1.7e+09
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 9.0
# HELP vllm:prefix_cache_hits_total Hits.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0"} 5.0
vllm:prefix_cache_hits_total{engine="1"} 6.0
"""
    assert parse_counters(text) == {"requests": 7.0, "hits": 11.0}


def test_parse_counters_of_an_empty_exposition_is_empty() -> None:
    assert parse_counters("") == {}


# --------------------------------------------------------------------------------------------
# counter_delta


def test_counter_delta_is_after_minus_before_per_endpoint() -> None:
    before = {"a": {"requests": 10.0, "hits": 100.0}, "b": {"requests": 1.0}}
    after = {"a": {"requests": 15.0, "hits": 160.0}, "b": {"requests": 1.0}}
    assert counter_delta(before, after) == {"a": {"requests": 5.0, "hits": 60.0}, "b": {"requests": 0.0}}


def test_a_counter_that_went_down_counts_from_zero() -> None:
    # The server restarted between the scrapes: what it counted since is all there is.
    before = {"a": {"requests": 50.0, "hits": 900.0}}
    after = {"a": {"requests": 3.0, "hits": 950.0}}
    assert counter_delta(before, after) == {"a": {"requests": 3.0, "hits": 50.0}}


def test_counter_delta_of_new_endpoints_and_counters_counts_from_zero() -> None:
    before = {"a": {"requests": 5.0}, "gone": {"requests": 9.0}}
    after = {"a": {"requests": 6.0, "preemptions": 2.0}, "new": {"requests": 4.0}, "silent": {}}
    assert counter_delta(before, after) == {
        "a": {"requests": 1.0, "preemptions": 2.0},
        "new": {"requests": 4.0},
        "silent": {},
    }


# --------------------------------------------------------------------------------------------
# scrape_counters and the child-process fleet


@pytest.fixture
async def live() -> AsyncIterator[str]:
    async with SimFleet(ports=[0], engine=FAST) as fleet:
        yield fleet.addresses[0]


@pytest.mark.timeout(30)
async def test_scrape_counters_maps_an_endpoint_that_does_not_answer_to_nothing(live: str) -> None:
    (dead_port,) = free_ports(1)
    dead = f"127.0.0.1:{dead_port}"

    scraped = await scrape_counters([live, dead], timeout=2.0)

    assert list(scraped) == [live, dead]
    assert scraped[dead] == {}
    assert scraped[live]["requests"] == 0
    assert "queries" in scraped[live]


@pytest.mark.timeout(60)
async def test_start_fleet_serves_every_endpoint_on_loopback(tmp_path: Path) -> None:
    spec = SimFleetSpec(servers=2, kv_blocks=64, time_dilation=1.0)
    child, endpoints = await start_fleet(spec, tmp_path / "fleet.log", timeout=30)
    try:
        assert len(endpoints) == 2
        assert len(set(endpoints)) == 2
        assert all(e.startswith("127.0.0.1:") for e in endpoints)
        scraped = await scrape_counters(endpoints)
        assert all(scraped[e].get("requests") == 0 for e in endpoints)
    finally:
        await child.stop()
    assert child.proc is not None
    assert child.proc.poll() is not None
