"""``igw bench compare``: a step's figures, the ladder (saturation, failed arms), the CLI, one real run.

The ladder runs in-process against the simulator (the arm is a direct connection to the first server);
one end-to-end test runs the real command: ``igw run`` and Envoy alone in front of a simulated fleet.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from igw_bench import compare
from igw_bench.arms import ArmSpec, RunningArm
from igw_bench.cli import main as bench_main
from igw_bench.client import Result
from igw_bench.compare import CompareOptions, build_step, describe_workload, run_compare, step_stats
from igw_bench.fleet import SimFleetSpec
from igw_bench.openloop import Sent
from igw_bench.sysstats import child_pids, descendants, rss_bytes
from igw_bench.textgen import HttpRequest
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# step_stats

_REQUEST = HttpRequest(index=0, at=0.0, parts=("x",), max_tokens=1, model="m", output_key=None, prompt_tokens=1)


def _ok(sent_at: float, ttft: float, e2e: float, tokens: int, prompt: int = 0, cached: int = 0) -> Sent:
    return Sent(
        _REQUEST, sent_at, Result(True, 200, ttft, e2e, tokens, "a", prompt_tokens=prompt, cached_tokens=cached)
    )


def _failed(sent_at: float, e2e: float, status: int, error: str) -> Sent:
    return Sent(_REQUEST, sent_at, Result(False, status, None, e2e, 0, None, error))


BOOM = "boom " * 30
SENT = [
    _ok(0.0, 0.2, 1.2, 11, prompt=100, cached=40),
    _ok(1.0, 0.4, 2.4, 21, prompt=200, cached=100),
    _ok(2.0, 0.6, 1.6, 1, prompt=100, cached=0),
    _failed(3.0, 5.0, 0, "unfinished"),  # the last to end: at 8 real seconds
    _failed(0.5, 0.1, 500, BOOM),
    _failed(3.5, 4.5, 0, "unfinished"),
]
SERVERS = {
    "b": {"requests": 1.0, "queries": 100.0, "hits": 10.0},
    "a": {"requests": 3.0, "queries": 300.0, "hits": 90.0, "preemptions": 1.0},
    "c": {},
}


def _stats(dilation: float = 2.0, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"cpu_s": 0.4, "rss": 3 * 2**20, **kw}
    return step_stats(SENT, SERVERS, dilation=dilation, **args)


def test_step_stats_counts_requests_and_groups_errors() -> None:
    stats = _stats()
    assert (stats["requests"], stats["ok"], stats["failed"]) == (6, 3, 3)
    assert stats["errors"] == {"0 unfinished": 2, f"500 {BOOM[:60]}".strip(): 1}


def test_step_stats_latencies_are_simulated_seconds_of_successful_requests() -> None:
    stats = _stats(dilation=2.0)
    assert stats["ttft_s"]["p50"] == pytest.approx(0.2)
    assert stats["ttft_s"]["p99"] == pytest.approx(0.3)
    assert stats["e2e_s"]["p50"] == pytest.approx(0.8)
    assert stats["e2e_s"]["p99"] == pytest.approx(1.2)
    # (e2e - ttft) / (tokens - 1) / dilation; a one-token answer has no inter-token latency.
    assert stats["itl_s"]["p50"] == pytest.approx(0.05)
    assert stats["itl_s"]["p90"] == pytest.approx(0.05)


def test_step_stats_throughput_is_over_the_steps_span_in_simulated_seconds() -> None:
    stats = _stats(dilation=2.0)
    assert stats["span_s"] == pytest.approx(4.0)  # the last end, 8 real seconds, / 2
    assert stats["output_tokens_per_s"] == pytest.approx(33 / 4.0)
    assert stats["requests_per_s"] == pytest.approx(3 / 4.0)


def test_time_dilation_divides_latencies_and_multiplies_rates() -> None:
    slow, real = _stats(dilation=4.0), _stats(dilation=1.0)
    assert slow["ttft_s"]["p90"] == pytest.approx(real["ttft_s"]["p90"] / 4)
    assert slow["e2e_s"]["p90"] == pytest.approx(real["e2e_s"]["p90"] / 4)
    assert slow["output_tokens_per_s"] == pytest.approx(real["output_tokens_per_s"] * 4)
    assert slow["requests_per_s"] == pytest.approx(real["requests_per_s"] * 4)
    # The gateway's CPU is real time, whatever the dilation.
    assert slow["gateway_cpu_cores"] == pytest.approx(real["gateway_cpu_cores"])


def test_step_stats_hit_rates_from_usage_and_from_the_servers() -> None:
    stats = _stats()
    assert stats["hit_rate_usage"] == pytest.approx(140 / 400)  # cached / prompt tokens of ok requests
    assert stats["hit_rate_server"] == pytest.approx(100 / 400)  # hits / queries over every server
    assert stats["preemptions"] == 1.0


def test_step_stats_endpoint_share_and_hotspot() -> None:
    stats = _stats()
    assert stats["endpoint_share"] == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert list(stats["endpoint_share"]) == ["a", "b", "c"]
    assert stats["hotspot"] == pytest.approx(3 * 0.75)


def test_step_stats_gateway_cost() -> None:
    stats = _stats(cpu_s=0.4, rss=3 * 2**20)
    assert stats["gateway_cpu_cores"] == pytest.approx(0.4 / 8.0)
    assert stats["gateway_cpu_ms_per_request"] == pytest.approx(400 / 3)
    assert stats["gateway_rss_mib"] == pytest.approx(3.0)
    unknown = _stats(cpu_s=None, rss=None)
    assert unknown["gateway_cpu_cores"] is None
    assert unknown["gateway_cpu_ms_per_request"] is None
    assert unknown["gateway_rss_mib"] is None


def test_step_stats_of_nothing_is_empty_not_an_error() -> None:
    stats = step_stats([], {"a": {}, "b": {}}, dilation=1.0, cpu_s=0.0, rss=0)
    assert (stats["requests"], stats["ok"], stats["failed"]) == (0, 0, 0)
    assert math.isnan(stats["ttft_s"]["p90"])
    assert stats["output_tokens_per_s"] == 0.0
    assert stats["hit_rate_server"] == 0.0
    assert stats["endpoint_share"] == {"a": 0.0, "b": 0.0}
    assert math.isnan(stats["hotspot"])
    assert stats["gateway_cpu_ms_per_request"] is None


# --------------------------------------------------------------------------------------------
# The gateway's processes


@pytest.fixture
def process_tree() -> Iterator[tuple[int, list[int]]]:
    """A shell (its own process group) with two sleeping children: ``(shell pid, children pids)``."""
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(child_pids(proc.pid)) < 2:
            assert time.monotonic() < deadline, "the shell did not start its children"
            time.sleep(0.01)
        yield proc.pid, sorted(child_pids(proc.pid))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.timeout(20)
def test_the_gateways_cost_counts_every_process_below_its_pids_once(process_tree: tuple[int, list[int]]) -> None:
    shell, children = process_tree
    arm = RunningArm(ArmSpec("x", "igw"), "http://127.0.0.1:1", [], {"epp": shell, "envoy": children[0]})

    pids = compare._gateway_pids(arm)

    assert sorted(pids) == sorted([shell, *children])
    assert compare._rss(pids) >= sum(rss_bytes(p) or 0 for p in children) > 0
    assert compare._cpu(pids) >= 0.0


def test_a_gone_process_has_no_rss_and_no_descendants() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert rss_bytes(proc.pid) is None
    assert descendants(proc.pid) == [proc.pid]
    assert compare._rss([proc.pid]) == 0


# --------------------------------------------------------------------------------------------
# Steps

W4 = "w4:groups=2,system=16,question=4,output=3"


def _opts(tmp_path: Path, **kw: Any) -> CompareOptions:
    base: dict[str, Any] = {
        "workload": W4,
        "arms": (ArmSpec("igw", "igw"),),
        "qps": (20.0, 40.0),
        "step_s": 0.5,
        "warmup_s": 0.25,
        "fleet": SimFleetSpec(servers=2, kv_blocks=64, time_dilation=1.0),
        "out_dir": tmp_path,
    }
    base.update(kw)
    return CompareOptions(**base)


def test_a_step_is_the_same_for_every_arm_and_new_in_every_step(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    one = build_step(opts, 20.0, 2.0, 5, "step0")
    assert one == build_step(opts, 20.0, 2.0, 5, "step0")
    assert one
    assert all(r.at <= 2.0 for r in one)
    other = build_step(opts, 20.0, 2.0, 5, "step1")
    assert [r.parts[1] for r in one] != [r.parts[1] for r in other]  # w4 questions are per step


@pytest.mark.parametrize("key", ["qps", "duration", "requests", "seed"])
def test_a_workload_may_not_set_what_the_bench_sets(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        describe_workload(_opts(tmp_path, workload=f"w4:{key}=3"))


def test_describe_workload_leaves_out_the_rate() -> None:
    text = describe_workload(_opts(Path("unused")))
    assert text.startswith("w4: 2 groups")
    assert "Poisson" not in text


def test_w1_is_sized_from_the_fleets_cache(tmp_path: Path) -> None:
    small = _opts(tmp_path, workload="w1:fill=0.5,system=100,prompts=1,question=28",
                  fleet=SimFleetSpec(servers=1, kv_blocks=64))  # fmt: skip
    big = _opts(tmp_path, workload="w1:fill=0.5,system=100,prompts=1,question=28",
                fleet=SimFleetSpec(servers=4, kv_blocks=64))  # fmt: skip
    # 0.5 x 1 x 64 x 16 tokens / 128 tokens per group = 4 groups; four servers hold 16.
    assert describe_workload(small).startswith("w1: 4 groups")
    assert describe_workload(big).startswith("w1: 16 groups")


# --------------------------------------------------------------------------------------------
# The ladder, in-process: the simulator as the fleet, a direct connection as the arm

FAST = EngineConfig(max_num_seqs=8, kv_blocks=256, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=1)


class _FakeFleets:
    """``start_fleet`` and ``start_arm`` for compare: in-process fleets; ``broken`` arms fail to start."""

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.started = 0
        self.stopped = 0
        self.workdirs: list[Path] = []

    async def start_fleet(self, spec: SimFleetSpec, log_path: Path, **_: Any) -> tuple[Any, list[str]]:
        fleet = SimFleet(ports=[0] * spec.servers, engine=FAST)
        await fleet.start()
        self.started += 1
        owner = self

        class Handle:
            async def stop(self, **_: Any) -> None:
                await fleet.stop()
                owner.stopped += 1

        return Handle(), fleet.addresses

    async def start_arm(self, spec: ArmSpec, endpoints: list[str], workdir: Path, **_: Any) -> RunningArm:
        self.workdirs.append(workdir)
        if spec.name in self.broken:
            raise OSError(f"{spec.name} cannot start here")
        return RunningArm(spec, f"http://{endpoints[0]}", children=[], pids={})


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Callable[..., _FakeFleets]:
    def install(broken: set[str] | None = None) -> _FakeFleets:
        fake = _FakeFleets(broken or set())
        monkeypatch.setattr(compare, "start_fleet", fake.start_fleet)
        monkeypatch.setattr(compare, "start_arm", fake.start_arm)
        return fake

    return install


@pytest.mark.timeout(60)
async def test_every_step_counts_only_its_own_requests(tmp_path: Path, fakes: Callable[..., _FakeFleets]) -> None:
    fake = fakes()
    opts = _opts(tmp_path)
    logged: list[str] = []

    report = await run_compare(opts, log=logged.append)

    (arm,) = report["arms"]
    assert "error" not in arm
    assert [s["qps"] for s in arm["steps"]] == [20.0, 40.0]
    for i, step in enumerate(arm["steps"]):
        expected = len(build_step(opts, step["qps"], opts.step_s, opts.seed + i, f"step{i}"))
        assert step["requests"] == expected > 0
        assert step["ok"] == expected
        # Every request went to the first server.
        assert sorted(step["endpoint_share"].values()) == [0.0, 1.0]
        assert step["hotspot"] == pytest.approx(2.0)
        # The servers' counters, read before and after, saw this step's requests and no others (not the
        # warm-up's, not the previous step's): their hit rate is the one the answers' usage reports.
        assert step["hit_rate_usage"] > 0
        assert step["hit_rate_server"] == pytest.approx(step["hit_rate_usage"])
    assert report["workload"]["warmup_qps"] == 40.0  # the ladder's middle rate
    assert fake.started == fake.stopped == 1
    assert any("igw @ 20 QPS" in line for line in logged)
    logs = Path(report["logs"])
    assert logs.is_relative_to(tmp_path)
    assert await asyncio.to_thread(logs.is_dir)
    assert fake.workdirs == [logs]  # the arm's logs go there too


@pytest.mark.timeout(60)
async def test_a_saturated_arm_skips_its_higher_steps(tmp_path: Path, fakes: Callable[..., _FakeFleets]) -> None:
    fakes()
    opts = _opts(tmp_path, qps=(20.0, 40.0, 80.0), saturated_ttft_s=1e-9)

    report = await run_compare(opts, log=lambda _: None)

    steps = report["arms"][0]["steps"]
    assert "skipped" not in steps[0]
    assert steps[0]["ok"] > 0
    assert steps[1:] == [
        {"qps": 40.0, "skipped": "saturated at 20 QPS"},
        {"qps": 80.0, "skipped": "saturated at 20 QPS"},
    ]


@pytest.mark.timeout(60)
async def test_an_arm_that_fails_to_start_is_reported_and_the_others_still_run(
    tmp_path: Path, fakes: Callable[..., _FakeFleets]
) -> None:
    fake = fakes(broken={"envoy-rr"})
    arms = (ArmSpec("envoy-rr", "envoy", "ROUND_ROBIN"), ArmSpec("igw", "igw"))
    logged: list[str] = []

    report = await run_compare(_opts(tmp_path, arms=arms, qps=(20.0,)), log=logged.append)

    broken, fine = report["arms"]
    assert broken["arm"] == "envoy-rr"
    assert broken["error"] == "envoy-rr cannot start here"
    assert broken["steps"] == []
    assert "error" not in fine
    assert fine["steps"][0]["ok"] > 0
    assert fake.started == fake.stopped == 2  # the broken arm's fleet is stopped too
    assert any(line.startswith("envoy-rr: failed") for line in logged)


# --------------------------------------------------------------------------------------------
# The command line

TINY = ["--servers", "2", "--workload", "w4:groups=4,system=64,question=16,output=8", "--qps", "4",
        "--step-s", "3", "--warmup-s", "1", "--time-dilation", "1", "--kv-blocks", "512"]  # fmt: skip


def _with(args: list[str], **changes: str) -> list[str]:
    out = list(args)
    for flag, value in changes.items():
        name = "--" + flag.replace("_", "-")
        if name in out:
            out[out.index(name) + 1] = value
        else:
            out += [name, value]
    return out


BAD_IDS = ["unknown-arm", "missing-config", "no-arms", "zero-qps", "negative-qps", "qps-not-a-number",
           "workload-sets-qps", "workload-sets-seed", "unknown-workload", "unknown-parameter"]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        ({"arms": "igw,nginx"}, "nginx"),
        ({"arms": "igw:/no/such/config.yaml"}, "/no/such/config.yaml"),
        ({"arms": " , "}, "--arms"),
        ({"qps": "0"}, "> 0"),
        ({"qps": "4,-1"}, "> 0"),
        ({"qps": "four"}, "four"),
        ({"workload": "w4:qps=3"}, "qps"),
        ({"workload": "w4:groups=4,seed=2"}, "seed"),
        ({"workload": "w9"}, "w9"),
        ({"workload": "w4:colour=3"}, "colour"),
    ],
    ids=BAD_IDS,
)
def test_bad_arguments_exit_2_with_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, str], mentions: str
) -> None:
    argv = ["compare", *_with([*TINY, "--arms", "igw", "--out", str(tmp_path / "out")], **changes)]

    code = bench_main(argv)

    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("igw bench compare: error: ")
    assert mentions in lines[0]
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.envoy
@pytest.mark.timeout(120)
def test_compare_runs_igw_and_envoy_alone_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [sys.executable, "-m", "igw", "bench", "compare", *TINY, "--arms", "igw,envoy-rr", "--out", str(out)]

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=tmp_path, check=False)

    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob("compare-w4-*.json")
    (md_path,) = out.glob("compare-w4-*.md")
    (png_path,) = out.glob("compare-w4-*.png")
    assert png_path.read_bytes().startswith(PNG_MAGIC)
    report = json.loads(json_path.read_text())
    assert [a["arm"] for a in report["arms"]] == ["igw", "envoy-rr"]
    for arm in report["arms"]:
        assert "error" not in arm, arm
        (step,) = arm["steps"]
        assert step["qps"] == 4.0
        assert step["requests"] > 0
        assert step["ok"] == step["requests"], step["errors"]
        assert step["failed"] == 0
        assert 0.0 <= step["hit_rate_server"] <= 1.0
        assert 0.0 <= step["hit_rate_usage"] <= 1.0
        assert len(step["endpoint_share"]) == 2
        assert all(e.startswith("127.0.0.1:") for e in step["endpoint_share"])
        assert sum(step["endpoint_share"].values()) == pytest.approx(1.0)
        assert step["gateway_cpu_ms_per_request"] is not None
    # Both arms saw the very same requests.
    assert report["arms"][0]["steps"][0]["requests"] == report["arms"][1]["steps"][0]["requests"]
    markdown = md_path.read_text()
    assert "| 4 | igw |" in markdown
    assert "| 4 | envoy-rr |" in markdown
    assert "vs envoy-rr" in markdown
    assert markdown in proc.stdout
    assert f"wrote {json_path}" in proc.stdout
    assert Path(report["logs"]).is_dir()
