"""A real-time continuous-batching model of one vLLM engine.

Model (deliberately simple, in the spirit of llm-d-inference-sim's per-token latency calculator):

* A submitted request joins a FIFO *waiting* queue. It is moved to *running* as soon as fewer than
  ``max_num_seqs`` sequences are running. Admission is strictly in arrival order.
* Once running, its first token is due ``prefill_overhead_ms + prompt_tokens * prefill_ms_per_token``
  after it started running, so TTFT = queueing + prefill. Each further token is due one inter-token
  latency after the previous one's due time. The ITL is ``itl_ms`` times a load factor rising linearly
  from 1.0 with one running sequence to ``itl_slowdown_at_full_batch`` with ``max_num_seqs`` running,
  evaluated when the token is scheduled.
* Running sequences progress independently (no global step loop); batch size only shows through the
  load factor. There is no EOS: a request always generates exactly ``max_tokens`` tokens and finishes
  with ``finish_reason="length"``.
* KV usage = sum over running sequences of ``ceil((prompt + generated) / block_size)``, divided by
  ``kv_blocks``, capped at 1.0. There is no preemption and no prefix cache.

Time is the event loop's clock (``loop.time()``); sleeps are real ``asyncio.sleep`` calls, so the
simulator runs in wall-clock time and can be driven by real clients.

Ownership: :meth:`Engine.submit` returns a :class:`Generation`, which the caller iterates for tokens and
must close (``async with`` or :meth:`Generation.close`) when it stops early, for example on a client
disconnect. An exception or cancellation raised out of the iteration closes it automatically.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from igw_sim import tokenizer
from igw_sim.stats import E2E_BUCKETS, ITL_BUCKETS, QUEUE_BUCKETS, TTFT_BUCKETS, Histogram

__all__ = [
    "ContextLengthError",
    "Engine",
    "EngineConfig",
    "Generation",
    "QueueFullError",
    "Token",
]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Capacity and latency knobs of one simulated engine. Validated on construction (``ValueError``)."""

    max_num_seqs: int = 8
    """Maximum number of running sequences (vLLM ``--max-num-seqs``)."""
    max_waiting: int = 1000
    """Maximum waiting requests; a request arriving beyond it is rejected (HTTP 429)."""
    prefill_overhead_ms: float = 20.0
    """Fixed part of the prefill time."""
    prefill_ms_per_token: float = 0.05
    """Prefill time per prompt token."""
    itl_ms: float = 10.0
    """Inter-token latency with a single running sequence."""
    itl_slowdown_at_full_batch: float = 1.5
    """ITL multiplier when ``max_num_seqs`` sequences run (linear from 1.0 at one sequence)."""
    kv_blocks: int = 2048
    """KV cache size in blocks (reported as ``num_gpu_blocks``)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_model_len: int = 131_072
    """Maximum ``prompt_tokens + max_tokens`` of one request; beyond it the request is rejected (400)."""

    def __post_init__(self) -> None:
        positive_ints = ("max_num_seqs", "kv_blocks", "block_size", "max_model_len")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        for name in ("prefill_overhead_ms", "prefill_ms_per_token", "itl_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.itl_slowdown_at_full_batch < 1.0:
            raise ValueError("itl_slowdown_at_full_batch must be >= 1.0")


class QueueFullError(Exception):
    """The waiting queue already holds ``max_waiting`` requests."""


class ContextLengthError(ValueError):
    """``prompt_tokens + max_tokens`` exceeds ``max_model_len``."""


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. ``last`` is true on the final token (``index == max_tokens - 1``)."""

    index: int
    piece: str
    last: bool


class Engine:
    """One simulated engine. Not thread-safe; use it from a single event loop.

    Counters are cumulative since construction; gauges (:attr:`running`, :attr:`waiting`,
    :attr:`kv_usage`) are read live.
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config if config is not None else EngineConfig()
        self._waiting: deque[Generation] = deque()
        self._running: set[Generation] = set()
        self.requests_total = 0
        """Requests accepted by :meth:`submit`."""
        self.prompt_tokens_total = 0
        """Prompt tokens of requests whose prefill completed."""
        self.generation_tokens_total = 0
        self.success_total: dict[str, int] = {}
        """Finished requests by finish reason."""
        self.aborted_total = 0
        """Requests closed before their last token (client disconnects)."""
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue_time = Histogram(QUEUE_BUCKETS)

    @property
    def running(self) -> int:
        """Sequences currently holding a running slot (prefilling or decoding)."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests queued for a running slot."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks used by running sequences, in ``[0, 1]``."""
        size = self.config.block_size
        used = sum(math.ceil((g.prompt_tokens + g.generated) / size) for g in self._running)
        return min(1.0, used / self.config.kv_blocks)

    def itl_factor(self) -> float:
        """The current ITL multiplier: 1.0 at <= 1 running sequence, the configured slowdown at full batch."""
        cfg = self.config
        if cfg.max_num_seqs <= 1 or len(self._running) <= 1:
            return 1.0
        share = (min(len(self._running), cfg.max_num_seqs) - 1) / (cfg.max_num_seqs - 1)
        return 1.0 + (cfg.itl_slowdown_at_full_batch - 1.0) * share

    def submit(self, *, prompt_tokens: int, max_tokens: int, seed: int = 0) -> Generation:
        """Queue a request and return its (not yet started) generation.

        Must be called from inside the running event loop. Raises :class:`QueueFullError` when
        ``max_waiting`` requests already wait, :class:`ContextLengthError` when the request cannot fit
        ``max_model_len``, and ``ValueError`` for ``prompt_tokens < 0`` or ``max_tokens < 1``.
        ``seed`` selects the generated words (see :func:`igw_sim.tokenizer.generated_piece`).
        """
        if prompt_tokens < 0 or max_tokens < 1:
            raise ValueError("prompt_tokens must be >= 0 and max_tokens >= 1")
        limit = self.config.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
            )
        # FIFO invariant: requests wait only while every slot is taken.
        if len(self._running) >= self.config.max_num_seqs and len(self._waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        gen = Generation(self, prompt_tokens=prompt_tokens, max_tokens=max_tokens, seed=seed)
        self.requests_total += 1
        self._waiting.append(gen)
        self._schedule()
        return gen

    # -- internal, called by Generation -------------------------------------------------------------

    def _schedule(self) -> None:
        """Move waiting requests to running, in FIFO order, while slots are free."""
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            gen = self._waiting.popleft()
            self._running.add(gen)
            gen._start()

    def _release(self, gen: Generation) -> None:
        """Forget ``gen`` wherever it is and hand its slot to the next waiting request."""
        if gen in self._running:
            self._running.discard(gen)
            self._schedule()
        else:
            try:
                self._waiting.remove(gen)
            except ValueError:
                pass


class Generation:
    """The token stream of one request: an async iterator of :class:`Token` and an async context manager.

    Contract: yields exactly ``max_tokens`` tokens, then stops. :meth:`close` is idempotent; closing
    before the last token frees the slot (or leaves the queue) and counts the request as aborted.
    """

    def __init__(self, engine: Engine, *, prompt_tokens: int, max_tokens: int, seed: int) -> None:
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.seed = seed
        self.generated = 0
        self.finish_reason: str | None = None
        self.arrival = self._loop.time()
        self._granted: asyncio.Future[None] = self._loop.create_future()
        self._due = 0.0
        self._last_emit = 0.0
        self._closed = False

    def _start(self) -> None:
        cfg = self._engine.config
        now = self._loop.time()
        self._engine.queue_time.observe(now - self.arrival)
        prefill_ms = cfg.prefill_overhead_ms + self.prompt_tokens * cfg.prefill_ms_per_token
        self._due = now + prefill_ms / 1000.0
        if not self._granted.done():
            self._granted.set_result(None)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Token:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._next()
        except BaseException:
            self.close()
            raise

    async def _next(self) -> Token:
        engine = self._engine
        if self.generated == 0:
            await self._granted
            if self._closed:  # closed by another task while queued
                raise StopAsyncIteration
        else:
            self._due += engine.config.itl_ms * engine.itl_factor() / 1000.0
        delay = self._due - self._loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
            if self._closed:
                raise StopAsyncIteration
        now = self._loop.time()
        if self.generated == 0:
            engine.ttft.observe(now - self.arrival)
            engine.prompt_tokens_total += self.prompt_tokens
        else:
            engine.itl.observe(now - self._last_emit)
        self._last_emit = now
        index = self.generated
        self.generated += 1
        engine.generation_tokens_total += 1
        last = self.generated >= self.max_tokens
        if last:
            self.finish_reason = "length"
            engine.success_total["length"] = engine.success_total.get("length", 0) + 1
            engine.e2e.observe(now - self.arrival)
            self._closed = True
            engine._release(self)
        return Token(index=index, piece=tokenizer.generated_piece(self.seed, index), last=last)

    def close(self) -> None:
        """Stop the generation; free its slot or queue place. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._engine.aborted_total += 1
        if not self._granted.done():
            self._granted.set_result(None)  # wake a queued iterator; it sees _closed and stops
        self._engine._release(self)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
