"""igw's Endpoint Picker as a policy of the simulator's virtual-time replay."""

from __future__ import annotations

from pathlib import Path

import pytest

from igw.app.replay_router import IgwRouter
from igw.cli import main
from igw_sim.replay.cli import _config, build_parser
from igw_sim.replay.driver import run_replay
from igw_sim.replay.routers import make_router
from igw_sim.replay.workloads import build_workload


def test_igw_keeps_prefix_groups_together_in_virtual_time() -> None:
    args = build_parser().parse_args(["--engines", "4", "--workload", "w1:qps=8,duration=40,fill=0.73"])
    config = _config(args)
    requests = list(build_workload(args.workload, cluster_kv_tokens=4 * config.kv_blocks * config.block_size))
    igw = IgwRouter()
    ours = run_replay(requests, igw, engines=4, config=config, warmup=10).summary
    blind = run_replay(requests, make_router("least-queue", 0), engines=4, config=config, warmup=10).summary
    assert igw.refused == 0
    assert ours.completed == blind.completed > 0
    assert ours.prefix_hit_rate > blind.prefix_hit_rate + 0.4
    assert ours.ttft_p90 < blind.ttft_p90


def test_igw_policy_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "queue-only.yaml"
    config.write_text("plugins:\n- type: queue-scorer\n")
    argv = ["sim", "replay", "--engines", "2", "--workload", "w4:qps=5,duration=5", "--policies", "igw",
            "--igw-config", str(config)]  # fmt: skip
    assert main(argv) == 0
    assert "| igw |" in capsys.readouterr().out
