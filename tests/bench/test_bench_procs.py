"""Child processes and ports for the demo and the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from igw_bench.procs import Child, free_ports


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_free_ports_are_distinct() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(0 < port < 65536 for port in ports)


@pytest.mark.timeout(20)
async def test_start_returns_the_ready_line_and_stop_ends_the_process(tmp_path: Path) -> None:
    child = Child(
        "sleeper",
        _python("import time; print('noise'); print('ready at 1:2', flush=True); time.sleep(60)"),
        tmp_path / "c.log",
    )
    try:
        assert await child.start("ready at", timeout=10) == "ready at 1:2"
        assert child.proc is not None
        assert child.proc.poll() is None
    finally:
        status = await child.stop()
    assert status is not None
    assert status != 0  # ended by SIGTERM
    assert "noise" in child.tail()


@pytest.mark.timeout(20)
async def test_start_takes_a_predicate(tmp_path: Path) -> None:
    child = Child("sleeper", _python("import time; print('x ready', flush=True); time.sleep(60)"), tmp_path / "c.log")
    try:
        assert await child.start(lambda line: line.endswith("ready"), timeout=10) == "x ready"
    finally:
        await child.stop()


@pytest.mark.timeout(20)
async def test_a_child_that_exits_during_start_up_is_an_error_with_its_output(tmp_path: Path) -> None:
    child = Child("quitter", _python("import sys; print('bad flag'); sys.exit(3)"), tmp_path / "c.log")
    with pytest.raises(RuntimeError, match=r"quitter exited with status 3:\nbad flag"):
        await child.start("ready", timeout=10)
    assert await child.stop() == 3


@pytest.mark.timeout(20)
async def test_a_child_that_is_never_ready_times_out(tmp_path: Path) -> None:
    child = Child("mute", _python("import time; time.sleep(60)"), tmp_path / "c.log")
    try:
        with pytest.raises(TimeoutError, match="mute not ready after 0s"):
            await child.start("ready", timeout=0.2)
    finally:
        await child.stop()


@pytest.mark.timeout(20)
async def test_wait_http_ok_names_the_url_when_it_times_out(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    child = Child("mute", _python("import time; time.sleep(60)"), tmp_path / "c.log")
    child.spawn()
    try:
        with pytest.raises(TimeoutError, match=f"mute: http://127.0.0.1:{port}/ready not ready"):
            await child.wait_http_ok(f"http://127.0.0.1:{port}/ready", timeout=0.2)
    finally:
        await child.stop()


async def test_stopping_a_child_never_started_is_a_no_op(tmp_path: Path) -> None:
    assert await Child("never", ["true"], tmp_path / "c.log").stop() is None
