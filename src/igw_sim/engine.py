"""The real-time face of one simulated engine: :class:`Engine` drives an
:class:`~igw_sim.scheduler.EngineCore` on the event loop's clock and streams tokens to callers.

Time: the core runs in *simulated* seconds, ``loop.time() / time_dilation``. A step of ``d`` simulated
seconds takes ``d * time_dilation`` real seconds. Latency histograms are in simulated seconds (what an
H100 would show); clients see real, dilated, time.

Driving: one task per engine, started by the first :meth:`Engine.submit` on an idle engine and ending
when there is nothing left to compute. It plans a step, sleeps until the step's end, applies it and hands
the sampled tokens to their :class:`Generation`. Requests submitted in the same event-loop iteration
join the same first step. While the engine stays busy, steps follow each other back to back in simulated
time (a late wake-up is caught up, not accumulated), so the simulated timeline does not drift; after a
lag of more than :data:`MAX_LAG_S` it resynchronises with the clock.

Ownership: :meth:`Engine.submit` returns a :class:`Generation`, which the caller iterates for tokens and
must close (``async with`` or :meth:`Generation.close`) when it stops early, for example on a client
disconnect; closing before the engine finished the request aborts it and frees its KV blocks. An
exception or cancellation raised out of the iteration closes it automatically.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from igw_sim import tokenizer
from igw_sim.config import EngineConfig
from igw_sim.kvevents import KVEvent
from igw_sim.scheduler import (
    ContextLengthError,
    EngineCore,
    EngineStats,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestStatus,
    TokenOutput,
)

__all__ = [
    "MAX_LAG_S",
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "Generation",
    "InvalidRequestError",
    "QueueFullError",
    "Token",
]

MAX_LAG_S = 0.05
"""Real seconds the driver may fall behind the simulated timeline before it resynchronises."""

KVEventListener = Callable[[list[KVEvent]], None]


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. ``last`` is true on the final token (``index == max_tokens - 1``)."""

    index: int
    piece: str
    last: bool
    token_id: int = 0


class Engine:
    """One simulated engine in real time. Not thread-safe; use it from a single event loop."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.core = EngineCore(config)
        self.config = self.core.config
        self.kv_event_listeners: list[KVEventListener] = []
        """Called with each step's KV events (in order); must not block."""
        self._generations: dict[str, Generation] = {}
        self._task: asyncio.Task[None] | None = None
        self._busy_until = 0.0
        self._stalled_until = 0.0
        self._salts = itertools.count(1)

    # -- state ---------------------------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def running(self) -> int:
        """Requests in the running batch (prefilling or decoding)."""
        return len(self.core.running)

    @property
    def waiting(self) -> int:
        """Requests queued, preempted ones included."""
        return len(self.core.waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in ``[0, 1]``."""
        return self.core.kv.usage

    @property
    def requests_total(self) -> int:
        return self.core.stats.requests_total

    @property
    def aborted_total(self) -> int:
        return self.core.stats.aborted_total

    def now(self) -> float:
        """The current simulated time (seconds)."""
        return asyncio.get_running_loop().time() / self.config.time_dilation

    # -- requests ------------------------------------------------------------------------------------

    def submit(
        self,
        *,
        max_tokens: int,
        prompt_tokens: int | None = None,
        prompt_ids: Sequence[int] | None = None,
        seed: int = 0,
        lora: str | None = None,
        cache_salt: str | None = None,
    ) -> Generation:
        """Queue a request and return its generation.

        The prompt is either ``prompt_ids`` (token ids, which the prefix cache sees) or ``prompt_tokens``
        (a length: the ids are made up and never shared with another request). ``lora`` names a loaded
        adapter. Must be called inside the running event loop. Raises :class:`QueueFullError`,
        :class:`ContextLengthError` or :class:`InvalidRequestError` (a ``ValueError``).
        """
        if prompt_ids is None:
            if prompt_tokens is None or prompt_tokens < 0:
                raise InvalidRequestError("prompt_tokens must be >= 0")
            ids = tokenizer.synthetic_ids(prompt_tokens, next(self._salts))
        else:
            ids = list(prompt_ids)
        req = self.core.add_request(
            prompt_ids=ids, max_tokens=max_tokens, now=self.now(), seed=seed, lora_name=lora, cache_salt=cache_salt
        )
        gen = Generation(self, req)
        self._generations[req.request_id] = gen
        self._ensure_driver()
        return gen

    def abort_all(self) -> None:
        """Abort every request (a crash): their generations end without further tokens."""
        for gen in list(self._generations.values()):
            gen.close()

    def stall(self, seconds: float) -> None:
        """Compute nothing for ``seconds`` real seconds from now (a hung GPU); requests keep queueing."""
        loop = asyncio.get_running_loop()
        self._stalled_until = max(self._stalled_until, loop.time() + seconds)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (refused while requests hold blocks)."""
        done = self.core.reset_prefix_cache()
        self._flush_events()
        return done

    async def aclose(self) -> None:
        """Abort everything and stop the driver."""
        self.abort_all()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # -- driver --------------------------------------------------------------------------------------

    def _ensure_driver(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drive(), name="igw-sim-engine")

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        dilation = self.config.time_dilation
        busy = False
        try:
            while True:
                wall = loop.time()
                if wall < self._stalled_until:
                    await asyncio.sleep(self._stalled_until - wall)
                    busy = False
                    continue
                clock = wall / dilation
                lagging = (clock - self._busy_until) * dilation > MAX_LAG_S
                start = self._busy_until if busy and not lagging else max(clock, self._busy_until)
                plan = self.core.schedule(start)
                self._flush_events()
                if plan is None:
                    if not self.core.has_work:
                        return
                    # Only requests stamped after `start` (a caught-up grid) are left: resynchronise.
                    busy = False
                    self._busy_until = clock
                    await asyncio.sleep(0)
                    continue
                delay = plan.end * dilation - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                outputs = self.core.complete(plan)
                self._busy_until = plan.end
                busy = True
                self._flush_events()
                self._deliver(outputs)
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            rid = out.request.request_id
            gen = self._generations.get(rid)
            if gen is None:
                continue
            piece = self.config.tokenizer.generated_piece(out.request.seed, out.index)
            gen._push(Token(index=out.index, piece=piece, last=out.finished, token_id=out.token_id))
            if out.finished:
                del self._generations[rid]

    def _flush_events(self) -> None:
        events = self.core.take_kv_events()
        if events:
            for listener in self.kv_event_listeners:
                listener(events)

    def _forget(self, gen: Generation) -> None:
        self._generations.pop(gen.request.request_id, None)
        self.core.abort(gen.request)


class Generation:
    """The token stream of one request: an async iterator of :class:`Token` and an async context manager.

    Contract: yields exactly ``max_tokens`` tokens, then stops. :meth:`close` is idempotent; closing
    before the engine finished the request aborts it (freeing its slot or its queue place).
    """

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine = engine
        self.request = request
        self.generated = 0
        """Tokens handed to the consumer so far."""
        self.finish_reason: str | None = None
        self._tokens: deque[Token] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def max_tokens(self) -> int:
        return self.request.max_tokens

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (0 until the request is first scheduled)."""
        return max(self.request.num_cached_tokens, 0)

    def _push(self, token: Token) -> None:
        self._tokens.append(token)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Token:
        try:
            while not self._tokens:
                if self._closed:
                    raise StopAsyncIteration
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
                self._waiter = None
        except BaseException:
            self.close()
            raise
        token = self._tokens.popleft()
        self.generated += 1
        if token.last:
            self.finish_reason = "length"
            self._closed = True
        return token

    def close(self) -> None:
        """Stop the generation; abort it in the engine if it is not finished. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._tokens.clear()
        if self.request.status not in (RequestStatus.FINISHED, RequestStatus.ABORTED):
            self._engine._forget(self)
        self._wake()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
