"""Child processes for demos and benchmarks: start, wait for a ready line, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Child:
    """A subprocess whose stdout is watched for a ready marker; the lines are kept for errors."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._marker = ""

    async def start(self, ready_marker: str, *, timeout: float = 60.0) -> None:
        self._marker = ready_marker
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read(), name=f"{self.name} stdout")
        try:
            async with asyncio.timeout(timeout):
                waiter = asyncio.ensure_future(self._ready.wait())
                exited = asyncio.ensure_future(self.proc.wait())
                await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                exited.cancel()
                if not self._ready.is_set():
                    raise RuntimeError(f"{self.name} exited during start-up:\n" + "\n".join(self.lines[-30:]))
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n" + "\n".join(self.lines[-30:])) from None

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if len(self.lines) > 2000:
                del self.lines[:1000]
            if self._marker and self._marker in line:
                self._ready.set()

    async def stop(self, *, timeout: float = 15.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 2)
        return proc.returncode
