"""The commands a user types: ``igw run`` starts, serves, and stops cleanly; ``igw demo`` runs."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest
from e2e_support import chat, free_port

from igw_sim.fleet import SimFleet

pytestmark = pytest.mark.envoy


async def _wait_line(proc: asyncio.subprocess.Process, marker: str, timeout: float = 60) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError("process ended before it was ready:\n" + "".join(lines))
            lines.append(raw.decode())
            if marker in lines[-1]:
                return lines


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
async def test_igw_run_serves_and_stops_cleanly(fleet: SimFleet, stop_signal: signal.Signals) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "igw", "run", "--listen", f"127.0.0.1:{port}", "--admin-port", str(free_port()),
            "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()),
            "--metrics-port", str(free_port())]  # fmt: skip
    for address in fleet.addresses:
        argv += ["--endpoint", address]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await _wait_line(proc, "igw: gateway ready")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with aiohttp.ClientSession() as http, http.post(url, json=chat()) as r:
            assert r.status == 200
            assert r.headers["x-igw-sim-endpoint"] in fleet.addresses
        proc.send_signal(stop_signal)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        # Envoy went down with it: nothing listens on the gateway port any more
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_igw_run_rejects_bad_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "igw", "run", "--endpoint", "not-an-address"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "not-an-address" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "igw", "run", "--endpoint", "127.0.0.1:1", "--body-mode", "duplex"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert "fail open" in out.stderr


def test_igw_demo_runs_and_spreads_traffic() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "igw", "demo", "--requests", "40", "--port", str(free_port()), "--duration", "30"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "40/40 requests succeeded" in out.stdout
    assert "curl" in out.stdout


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--listen", "Envoy exited"), ("--grpc-port", "cannot bind the ext_proc port"),
     ("--grpc-health-port", "cannot bind the health port"), ("--metrics-port", "address already in use")],
    ids=["gateway", "ext_proc", "health", "metrics"],
)  # fmt: skip
def test_igw_run_reports_a_port_in_use(flag: str, message: str) -> None:
    ports = {f: str(free_port()) for f in ("--admin-port", "--grpc-port", "--grpc-health-port", "--metrics-port")}
    ports["--listen"] = f"127.0.0.1:{free_port()}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports[flag] = f"127.0.0.1:{port}" if flag == "--listen" else str(port)
        argv = [sys.executable, "-m", "igw", "run", "--endpoint", "127.0.0.1:1"]
        for name, value in ports.items():
            argv += [name, value]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr
