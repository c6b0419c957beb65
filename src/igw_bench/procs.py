"""Processes for demos and benchmarks: free loopback ports, child processes, the event loop.

A :class:`Child` writes its output to a log file (the parent never reads a pipe, so it spends
no CPU on the child's output while it measures), dies with its parent, and is ready once a
marker line shows in its log or an HTTP probe answers 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

HOST = "127.0.0.1"
"""The loopback address every child listens on."""

_POLL_S = 0.05
_T = TypeVar("_T")


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct free ports on ``host`` (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def run_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    result: _T = uvloop.run(coro)
    return result


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A child process whose output (stdout and stderr) goes to ``log_path``.

    It gets SIGTERM when the parent dies. ``start`` returns once a ready line shows in the log;
    both ``start`` and ``wait_until`` raise RuntimeError (with the log's tail) if the process
    exits first and TimeoutError if it is not ready in time. The caller always calls ``stop``.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    async def start(self, ready: str | Callable[[str], bool], *, timeout: float) -> str:
        """Spawn; return the first output line for which ``ready`` is true (or that contains it)."""
        is_ready = (lambda line: ready in line) if isinstance(ready, str) else ready
        found: list[str] = []

        async def ready_line() -> bool:
            with contextlib.suppress(OSError):
                found.extend(line for line in self.log_path.read_text(errors="replace").splitlines() if is_ready(line))
            return bool(found)

        self.spawn()
        await self.wait_until(ready_line, timeout=timeout)
        return found[0]

    async def wait_until(self, probe: Callable[[], Awaitable[bool]], *, timeout: float, what: str = "") -> None:
        """Poll ``probe`` until it is true (``what`` names it in the timeout message)."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await probe():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}")
            if loop.time() > deadline:
                subject = f"{self.name}: {what}" if what else self.name
                raise TimeoutError(f"{subject} not ready after {timeout:.0f}s:\n{self.tail()}")
            await asyncio.sleep(_POLL_S)

    async def wait_http_ok(self, url: str, *, timeout: float) -> None:
        """Wait until ``url`` answers 200 (the process must stay up meanwhile)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:

            async def ok() -> bool:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url) as resp:
                        return resp.status == 200
                return False

            await self.wait_until(ok, timeout=timeout, what=url)

    async def stop(self, *, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (None if never spawned)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        return proc.returncode
