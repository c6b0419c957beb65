"""``igw bench overhead`` end to end: a real Envoy alone and the real gateway, tiny durations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from igw_bench.overhead import format_table


@pytest.mark.envoy
@pytest.mark.timeout(90)
def test_overhead_runs_both_arms_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "igw", "bench", "overhead", "--duration", "0.5", "--warmup", "0.2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    files = list(out.glob("overhead-*.json"))
    assert len(files) == 1
    report = orjson.loads(files[0].read_bytes())
    assert set(report["sizes"]) == {"1k", "200k"}
    for size in report["sizes"].values():
        throughput = size["throughput"]
        for arm in ("A", "B"):
            assert throughput[arm]["rps"] > 0
            assert throughput[arm]["errors"] == 0
            assert size["latency_c1"][arm]["ok"] > 0
        assert throughput["ratio_b_over_a"] > 0
        assert size["epp_cpu_us_per_req"]["throughput"] > 0
    # every arm-B request went through the EPP (fail-close: none skipped it)
    assert report["ext_proc_stats_b"]["streams_started"] >= sum(s["issued"] for s in report["steps"] if s["arm"] == "B")
    assert report["ext_proc_stats_b"]["failure_mode_allowed"] == 0
    assert "| 1 KB (1,024 B) | 32 |" in proc.stdout
    assert format_table(report).splitlines()[2] in proc.stdout
