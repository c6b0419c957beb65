"""The raw HTTP/1.1 load client and one load step, against the real fake backend."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from igw_bench.backend import BACKEND_READY
from igw_bench.bodies import chat_body
from igw_bench.loadgen import ProtocolError, _chunked_end, run_step
from igw_bench.procs import Child


@pytest.mark.parametrize(
    ("body", "rest"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", b""),
        (b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"HTTP/1.1 200 OK\r\n"),
        (b"5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", b""),
    ],
    ids=["one-chunk", "extension-then-next-response", "trailer"],
)
def test_chunked_end_finds_the_end_of_a_complete_body(body: bytes, rest: bytes) -> None:
    assert _chunked_end(bytearray(body + rest), 0) == len(body)


@pytest.mark.parametrize("partial", [b"5\r\nhel", b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0\r\nTrailer: x\r\n"])
def test_chunked_end_waits_for_more_of_a_partial_body(partial: bytes) -> None:
    assert _chunked_end(bytearray(partial), 0) == -1


def test_chunked_end_rejects_a_bad_size() -> None:
    with pytest.raises(ProtocolError):
        _chunked_end(bytearray(b"zz\r\nhello\r\n"), 0)


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[Child]:
    child = Child(
        "backend",
        [sys.executable, "-m", "igw_bench.backend", "--count", "1", "--max-seconds", "60"],
        tmp_path / "b.log",
    )
    try:
        yield child
    finally:
        await child.stop()


@pytest.mark.timeout(30)
async def test_a_step_against_the_backend_counts_only_successes_in_the_window(backend: Child) -> None:
    line = await backend.start(lambda ln: ln.startswith(BACKEND_READY), timeout=20)
    (address,) = line.removeprefix(BACKEND_READY).split()
    port = int(address.rpartition(":")[2])
    await backend.wait_http_ok(f"http://{address}/health", timeout=10)

    result = await run_step(
        arm="A", size="1k", port=port, body=chat_body(1024), concurrency=4, warmup_s=0.1, duration_s=0.4,
        max_requests=1_000_000, pids={"backend": backend.pid, "loadgen": os.getpid()},
    )  # fmt: skip

    assert result.ok > 0
    assert result.errors == 0
    assert result.statuses == {"200": result.completed}
    assert result.issued >= result.completed
    assert result.rps > 0
    assert result.p50_ms <= result.p99_ms
    assert result.cpu_us_per_req["backend"] is not None
    assert result.cpu_pct["loadgen"] is not None
