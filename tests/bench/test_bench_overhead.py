"""``igw bench overhead``: the report built from step results, the table, the options, the fake
backend's routes, and one end-to-end run (a real Envoy alone, the real gateway, no peers)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from igw_bench import backend
from igw_bench.cli import main as bench_main
from igw_bench.loadgen import StepResult
from igw_bench.overhead import (
    PEER_KINDS,
    Arm,
    OverheadOptions,
    SizeSpec,
    build_report,
    concurrencies,
    format_table,
    parse_peers,
)

# --------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", ()),
        (" None ", ()),
        ("vllm-router", ("vllm-router",)),
        ("vllm-router, sglang-router,vllm-router", ("vllm-router", "sglang-router")),
        ("sglang-router,vllm-router", PEER_KINDS),
    ],
    ids=["none", "none-any-case", "one", "order-kept-duplicates-dropped", "both"],
)
def test_parse_peers(text: str, expected: tuple[str, ...]) -> None:
    assert parse_peers(text) == expected


@pytest.mark.parametrize(
    "text", ["", ",", "envoy", "sglang-router,lmcache"], ids=["empty", "comma", "other", "one-bad"]
)
def test_parse_peers_rejects_unknown_names(text: str) -> None:
    with pytest.raises(ValueError, match="--peers"):
        parse_peers(text)


def test_cli_rejects_bad_peers_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["overhead", "--peers", "haproxy"]) == 2
    assert "--peers: expected none or some of sglang-router, vllm-router" in capsys.readouterr().err


def test_concurrencies_are_the_throughput_step_then_one_without_repeats() -> None:
    assert concurrencies(SizeSpec("1k", "1 KB", 1024, 32)) == (32, 1)
    assert concurrencies(SizeSpec("1k", "1 KB", 1024, 1)) == (1,)


# --------------------------------------------------------------------------------------------
# The report


def _step(arm: str, size: str, c: int, p50: float, p99: float, rps: float, cpu: dict[str, float | None]) -> StepResult:
    return StepResult(
        arm=arm, size=size, body_bytes=1024, concurrency=c, window_s=1.0, completed=int(rps), ok=int(rps), errors=0,
        rps=rps, p50_ms=p50, p90_ms=p99, p99_ms=p99, mean_ms=p50, issued=int(rps), unfinished=0,
        statuses={"200": int(rps)}, cpu_us_per_req={"backend": 50.0, "loadgen": 30.0, **cpu},
        cpu_pct={"backend": 40.0, "loadgen": 20.0, **dict.fromkeys(cpu, 10.0)},
    )  # fmt: skip


ARMS = [
    Arm("direct", "no router", 1),
    Arm("envoy", "Envoy alone", 2, {"envoy": 10}),
    Arm("igw", "igw run", 3, {"epp": 11, "envoy": 12}),
    Arm("vllm-router", "vllm-router 0.1.17, round_robin", 4, {"router": 13}, "vllm-router 0.1.17"),
]
SIZES = [SizeSpec("1k", "1 KB", 1024, 4)]
#            arm            c  p50   p99   rps     router processes' CPU µs/request
STEPS = [
    _step("direct", "1k", 4, 0.5, 1.0, 8000.0, {}),
    _step("envoy", "1k", 4, 0.8, 2.0, 5000.0, {"envoy": 90.0}),
    _step("igw", "1k", 4, 3.0, 7.0, 1000.0, {"epp": 900.0, "envoy": 400.0}),
    _step("vllm-router", "1k", 4, 0.9, 2.5, 4000.0, {"router": 80.0}),
    _step("direct", "1k", 1, 0.1, 0.2, 9000.0, {}),
    _step("envoy", "1k", 1, 0.3, 0.6, 3000.0, {"envoy": None}),  # the process was gone
    _step("igw", "1k", 1, 2.0, 4.0, 400.0, {"epp": 1500.0, "envoy": 700.0}),
    _step("vllm-router", "1k", 1, 0.25, 0.5, 3500.0, {"router": 120.0}),
]


def _report(steps: list[StepResult] = STEPS, **extra: Any) -> dict[str, Any]:
    report = build_report(OverheadOptions(peers=("vllm-router",)), SIZES, ARMS, steps, {"streams_started": 1400})
    report.update(
        started="2026-11-22T00:00:00+00:00",
        machine={"cpus": 2, "envoy": "1.40.0", "loadavg_before": [4.5, 0, 0], "loadavg_after": [5.0, 0, 0]},
        epp_idle_cpu_pct=2.0,
        **extra,
    )
    return report


def test_report_gives_igw_added_latency_over_every_other_arm() -> None:
    at_c = _report()["sizes"]["1k"]["by_concurrency"]["4"]
    assert set(at_c["igw_added_ms"]) == {"direct", "envoy", "vllm-router"}
    assert at_c["igw_added_ms"]["envoy"] == pytest.approx({"p50_ms": 2.2, "p99_ms": 5.0, "mean_ms": 2.2})
    assert at_c["igw_added_ms"]["vllm-router"]["p99_ms"] == pytest.approx(4.5)
    assert at_c["igw_rps_ratio"]["vllm-router"] == pytest.approx(0.25)


def test_report_gives_every_arm_added_latency_over_direct() -> None:
    at_1 = _report()["sizes"]["1k"]["by_concurrency"]["1"]
    assert set(at_1["added_over_direct_ms"]) == {"envoy", "igw", "vllm-router"}
    assert at_1["added_over_direct_ms"]["vllm-router"]["p50_ms"] == pytest.approx(0.15)
    assert at_1["added_over_direct_ms"]["igw"]["p99_ms"] == pytest.approx(3.8)


def test_router_cpu_adds_up_the_router_processes_only() -> None:
    by_c = _report()["sizes"]["1k"]["by_concurrency"]
    assert by_c["4"]["arms"]["igw"]["router_cpu_us_per_req"] == pytest.approx(1300.0)
    assert by_c["4"]["arms"]["vllm-router"]["router_cpu_us_per_req"] == pytest.approx(80.0)
    assert by_c["4"]["arms"]["direct"]["router_cpu_us_per_req"] is None  # no router: not the backend's CPU
    assert by_c["1"]["arms"]["envoy"]["router_cpu_us_per_req"] is None  # a missing sample is not 0


def test_report_keys_arms_by_name_with_a_description() -> None:
    report = _report()
    assert report["format"] == 2
    assert report["arm_order"] == ["direct", "envoy", "igw", "vllm-router"]
    assert report["arms"]["vllm-router"] == {
        "description": "vllm-router 0.1.17, round_robin",
        "router_processes": ["router"],
        "version": "vllm-router 0.1.17",
    }
    assert report["arms"]["igw"]["router_processes"] == ["epp", "envoy"]
    assert report["options"]["peer_policy"] == "round_robin"


def test_an_arm_left_out_is_simply_absent() -> None:
    report = _report([s for s in STEPS if s.arm != "vllm-router"])
    at_c = report["sizes"]["1k"]["by_concurrency"]["4"]
    assert set(at_c["arms"]) == {"direct", "envoy", "igw"}
    assert "vllm-router" not in at_c["igw_added_ms"]
    assert "| vllm-router |" not in format_table(report)


def test_report_warns_about_errors_and_ext_proc_streams_that_skipped_the_epp() -> None:
    failing = [*STEPS[:-1], _step("vllm-router", "1k", 1, 0.25, 0.5, 3500.0, {"router": 1.0})]
    failing[-1].errors, failing[-1].statuses = 3, {"200": 3500, "502": 3}
    warnings = build_report(OverheadOptions(), SIZES, ARMS, failing, {"streams_started": 10, "streams_failed": 2})[
        "warnings"
    ]
    assert any(w.startswith("igw: Envoy's ext_proc counted 2 failed streams") for w in warnings)
    assert "igw: 10 ext_proc streams for 1400 requests" in warnings
    assert any(w.startswith("vllm-router 1k c=1: 3 errors {'200': 3500, '502': 3}") for w in warnings)


def test_table_has_a_row_per_arm_and_concurrency_in_run_order() -> None:
    table = format_table(_report())
    rows = [line for line in table.splitlines() if line.startswith("| 1 KB")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        [c, arm] for c in ("4", "1") for arm in ("direct", "envoy", "igw", "vllm-router")
    ]
    assert (
        rows[1] == "| 1 KB (1,024 B) | 4 | envoy | 5,000 | 0.80 | 2.00 | +0.30 / +1.00 | 90 | +2.20 / +5.00 | 0.20x |"
    )
    assert rows[2] == "| 1 KB (1,024 B) | 4 | igw | 1,000 | 3.00 | 7.00 | +2.50 / +6.00 | 1,300 (EPP 900) | - | - |"
    assert rows[0].endswith("| - | - | +2.50 / +6.00 | 0.12x |")
    assert rows[5].split(" | ")[7] == "-"  # envoy at c=1: no CPU sample
    assert "- vllm-router: vllm-router 0.1.17, round_robin" in table
    assert "load average 4.5 before / 5.0 after" in table
    assert "--policy round_robin" in table


def test_table_is_the_same_from_the_json_file() -> None:
    report = _report(warnings=["w"])
    read_back = orjson.loads(orjson.dumps(report, option=orjson.OPT_SORT_KEYS))
    assert format_table(read_back) == format_table(report)


def test_nan_latencies_print_as_dashes() -> None:
    empty = [*STEPS[:-1], _step("vllm-router", "1k", 1, math.nan, math.nan, 0.0, {"router": None})]
    row = format_table(_report(empty)).splitlines()[-4]
    assert row == "| 1 KB (1,024 B) | 1 | vllm-router | 0 | - | - | - / - | - | - / - | - |"


# --------------------------------------------------------------------------------------------
# The fake backend's routes


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("POST", "/v1/chat/completions", 200, b'"chat.completion"'),
        ("GET", "/health", 200, b""),
        ("GET", "/v1/models", 200, b'"id":"bench-model"'),
        ("GET", "/metrics", 200, b"vllm:num_requests_waiting"),
        ("GET", "/server_info", 200, b'"served_model_name":"bench-model"'),
        ("GET", "/get_server_info", 200, b'"served_model_name":"bench-model"'),
        ("GET", "/model_info", 200, b'"served_model_name":"bench-model"'),
        ("GET", "/get_load", 200, b'"num_reqs":0'),
        ("HEAD", "/health", 200, b""),
        ("GET", "/v1/chat/completions", 405, b"use POST"),
        ("POST", "/health", 405, b"use GET"),
        ("GET", "/workers", 404, b'"not_found_error"'),
    ],
)
async def test_backend_routes(method: str, path: str, status: int, needle: bytes) -> None:
    resp = await backend._backend_handler(make_mocked_request(method, path))
    assert isinstance(resp, web.Response)
    assert resp.status == status
    body = resp.body
    assert isinstance(body, bytes)
    assert needle in body
    if status == 405:
        assert resp.headers["Allow"] in ("POST", "GET, HEAD")


def test_backend_server_info_names_no_model_path() -> None:
    # A model_path that is not a local directory sends sglang-router to huggingface.co.
    assert "model_path" not in orjson.loads(backend._SERVER_INFO)
    assert "model_path" not in orjson.loads(backend._MODEL_INFO)


# --------------------------------------------------------------------------------------------
# End to end


@pytest.mark.envoy
@pytest.mark.timeout(90)
def test_overhead_runs_the_arms_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "igw", "bench", "overhead", "--duration", "0.5", "--warmup", "0.2", "--out", str(out),
         "--peers", "none"],
        capture_output=True, text=True, timeout=80, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    files = list(out.glob("overhead-*.json"))
    assert len(files) == 1
    report = orjson.loads(files[0].read_bytes())
    assert report["arm_order"] == ["direct", "envoy", "igw"]
    assert set(report["sizes"]) == {"1k", "200k"}
    for size in report["sizes"].values():
        assert set(size["by_concurrency"]) == ({"32", "1"} if size["label"] == "1 KB" else {"8", "1"})
        for step in size["by_concurrency"].values():
            for arm in step["arms"].values():
                assert arm["rps"] > 0
                assert arm["errors"] == 0
            assert set(step["igw_added_ms"]) == {"direct", "envoy"}
            assert step["arms"]["igw"]["cpu_us_per_req"]["epp"] > 0
            assert step["arms"]["envoy"]["router_cpu_us_per_req"] > 0
    # every igw request went through the EPP (fail-close: none skipped it)
    igw_issued = sum(s["issued"] for s in report["steps"] if s["arm"] == "igw")
    assert report["ext_proc_stats_igw"]["streams_started"] >= igw_issued
    assert report["ext_proc_stats_igw"]["failure_mode_allowed"] == 0
    assert report["warnings"] == []
    assert "| 1 KB (1,024 B) | 32 | envoy |" in proc.stdout
    table = format_table(report).splitlines()
    assert all(line in proc.stdout for line in table if line.startswith("|"))
