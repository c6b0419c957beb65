"""CPU time of processes from /proc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igw_bench.sysstats import child_pids, cpu_seconds, sample_cpu


def test_cpu_seconds_of_this_process_grows_with_work() -> None:
    before = cpu_seconds(os.getpid())
    assert before is not None
    sum(i * i for i in range(2_000_000))
    after = cpu_seconds(os.getpid())
    assert after is not None
    assert after > before


def test_cpu_seconds_of_a_gone_process_is_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert cpu_seconds(proc.pid) is None
    assert sample_cpu({"gone": proc.pid, "me": os.getpid()})["gone"] is None


@pytest.mark.timeout(20)
def test_child_pids_finds_children_by_command_name() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert proc.pid in child_pids(os.getpid(), "sleep")
        assert proc.pid not in child_pids(os.getpid(), "no-such-command")
    finally:
        proc.kill()
        proc.wait()
