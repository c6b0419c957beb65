"""Task helpers: every background task is named, referenced, and logs its crash at once.

``asyncio.create_task`` is banned elsewhere in the package (ruff TID251): a task that nobody
references can be garbage-collected mid-run, and a task whose exception nobody reads fails
silently. :func:`spawn` fixes both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

log = logging.getLogger("igw.aio")
T = TypeVar("T")

_LIVE: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a named task, keep a strong reference until it ends, log a crash."""
    task = asyncio.create_task(coro, name=name)
    _LIVE.add(task)
    task.add_done_callback(_on_done)
    return task


def _on_done(task: asyncio.Task[Any]) -> None:
    _LIVE.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task %s crashed", task.get_name(), exc_info=exc)


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel the tasks and wait until they have all finished (exceptions are not re-raised)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Service:
    """Something with ``start`` and ``stop`` that is also an async context manager."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
