"""The discrete-event loop of a replay: arrivals, scrapes and completions in virtual time.

:func:`run_replay` feeds a workload, in arrival order, to a :class:`~igw_sim.replay.routers.Router`
and N virtual-time engines. Nothing runs between events: an engine is only brought forward (its steps
applied, see ``FastEngine.advance``) when something needs its state at some time:

* **a scrape**: every ``scrape_interval`` the metrics views of realistic policies are refreshed from every
  engine at that instant, and their ``dispatched`` counts reset;
* **an arrival**: the chosen engine is brought to the arrival time, then the request is queued;
* **a completion**, for policies that count their in-flight requests (``needs_completions``): each engine
  tells when its next request may finish (never too late); the loop keeps those times in a heap and
  brings the engine forward then, so ``on_complete`` is called before any later routing decision;
* **a live view** (the oracle): reading it brings that engine to the current time.

After the last arrival every engine runs until idle.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from igw_sim.config import EngineConfig
from igw_sim.replay.exactengine import ExactEngine, Materialiser
from igw_sim.replay.fastengine import FastEngine, RejectedError
from igw_sim.replay.requests import SimRequest
from igw_sim.replay.results import PolicySummary, Recorder
from igw_sim.replay.routers import EngineView, Router

__all__ = ["EngineModel", "LiveView", "ReplayRun", "ScrapedView", "VirtualEngine", "run_replay"]

EngineModel = Literal["fast", "exact"]


class VirtualEngine(Protocol):
    """What the loop needs of an engine (``FastEngine`` and ``ExactEngine`` both provide it)."""

    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def kv_usage(self) -> float: ...
    @property
    def prefix_queries(self) -> int: ...
    @property
    def prefix_hits(self) -> int: ...
    @property
    def preemptions(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def busy_s(self) -> float: ...
    @property
    def idle(self) -> bool: ...
    def submit(self, request: SimRequest, now: float) -> None: ...
    def advance(self, t: float) -> None: ...
    def next_wake(self) -> float: ...
    def cached_prefix_tokens(self, request: SimRequest) -> int: ...
    def predicted_ttft(self, request: SimRequest, now: float) -> float: ...


class _Clock:
    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0


class ScrapedView:
    """An engine's metrics as of the last scrape, plus what the policy sent it since."""

    __slots__ = ("_clock", "block_size", "dispatched", "index", "kv_usage", "max_num_seqs", "num_gpu_blocks",
                 "prefill_s_per_token", "running", "scraped_at", "waiting")  # fmt: skip

    def __init__(self, index: int, config: EngineConfig, clock: _Clock) -> None:
        self.index = index
        self.waiting = 0
        self.running = 0
        self.kv_usage = 0.0
        self.dispatched = 0
        self.scraped_at = 0.0
        self.block_size = config.block_size
        self.num_gpu_blocks = config.kv_blocks
        self.max_num_seqs = config.max_num_seqs
        self.prefill_s_per_token = config.profile.ms_per_token / 1000.0
        self._clock = clock

    @property
    def now(self) -> float:
        return self._clock.t

    def cached_prefix_tokens(self, request: SimRequest) -> int | None:
        return None

    def predicted_ttft(self, request: SimRequest) -> float | None:
        return None


class LiveView:
    """An engine's true state at the current time (for the oracle)."""

    __slots__ = ("_clock", "block_size", "engine", "index", "max_num_seqs", "num_gpu_blocks", "prefill_s_per_token")

    dispatched = 0

    def __init__(self, index: int, engine: VirtualEngine, config: EngineConfig, clock: _Clock) -> None:
        self.index = index
        self.engine = engine
        self.block_size = config.block_size
        self.num_gpu_blocks = config.kv_blocks
        self.max_num_seqs = config.max_num_seqs
        self.prefill_s_per_token = config.profile.ms_per_token / 1000.0
        self._clock = clock

    @property
    def now(self) -> float:
        return self._clock.t

    @property
    def scraped_at(self) -> float:
        return self._clock.t

    @property
    def waiting(self) -> int:
        self.engine.advance(self._clock.t)
        return self.engine.num_waiting

    @property
    def running(self) -> int:
        self.engine.advance(self._clock.t)
        return self.engine.num_running

    @property
    def kv_usage(self) -> float:
        self.engine.advance(self._clock.t)
        return self.engine.kv_usage

    def cached_prefix_tokens(self, request: SimRequest) -> int | None:
        self.engine.advance(self._clock.t)
        return self.engine.cached_prefix_tokens(request)

    def predicted_ttft(self, request: SimRequest) -> float | None:
        return self.engine.predicted_ttft(request, self._clock.t)


class ReplayRun:
    """The engines and the recorder of one finished replay (for tests and deeper looks)."""

    def __init__(self, summary: PolicySummary, engines: Sequence[VirtualEngine], recorder: Recorder) -> None:
        self.summary = summary
        self.engines = engines
        self.recorder = recorder


def _make_engines(
    n: int, config: EngineConfig, model: EngineModel, recorder: Recorder, predictions: bool
) -> list[VirtualEngine]:
    if model == "fast":
        return [FastEngine(config, index=i, recorder=recorder, predictions=predictions) for i in range(n)]
    if model == "exact":
        mat = Materialiser()
        return [ExactEngine(config, index=i, recorder=recorder, materialiser=mat) for i in range(n)]
    raise ValueError(f"unknown engine model {model!r} (fast or exact)")


def run_replay(
    requests: Iterable[SimRequest],
    router: Router,
    *,
    engines: int,
    config: EngineConfig,
    model: EngineModel = "fast",
    scrape_interval: float = 0.05,
    keep_requests: bool = False,
    warmup: float = 0.0,
) -> ReplayRun:
    """Replay ``requests`` (in arrival order) through ``router`` onto ``engines`` engines of ``config``.

    Requests that arrive before ``warmup`` seconds are simulated (they fill the caches) but not measured.
    """
    if engines < 1:
        raise ValueError("engines must be >= 1")
    if not scrape_interval > 0:
        raise ValueError("scrape_interval must be > 0")
    # The loop allocates millions of short-lived objects and no reference cycles: the cyclic collector
    # would only re-scan the live ones (about a tenth of the run time).
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        return _run(requests, router, engines=engines, config=config, model=model,
                    scrape_interval=scrape_interval, keep_requests=keep_requests, warmup=warmup)  # fmt: skip
    finally:
        if gc_enabled:
            gc.enable()


def _run(
    requests: Iterable[SimRequest],
    router: Router,
    *,
    engines: int,
    config: EngineConfig,
    model: EngineModel,
    scrape_interval: float,
    keep_requests: bool,
    warmup: float,
) -> ReplayRun:
    wall0 = time.perf_counter()
    track = bool(router.needs_completions)
    rec = Recorder(engines, track_completions=track, keep_requests=keep_requests, measure_from=warmup)
    engs = _make_engines(engines, config, model, rec, bool(router.true_state))
    clock = _Clock()
    scraped = [ScrapedView(i, config, clock) for i in range(engines)]
    views: Sequence[EngineView]
    if router.true_state:
        views = [LiveView(i, e, config, clock) for i, e in enumerate(engs)]
        next_scrape = math.inf
    else:
        views = scraped
        next_scrape = 0.0 if getattr(router, "reads_metrics", True) else math.inf
    if model == "fast":
        # The same loop, with the engines typed as what they are: compiled, every engine call is native.
        _loop_fast(requests, router, rec, [e for e in engs if isinstance(e, FastEngine)], scraped, views, clock,
                   next_scrape, scrape_interval, warmup)  # fmt: skip
    else:
        _loop(requests, router, rec, engs, scraped, views, clock, next_scrape, scrape_interval, warmup)
    wall = time.perf_counter() - wall0
    summary = rec.summary(policy=router.name, preemptions=sum(e.preemptions for e in engs), wall_s=wall)
    return ReplayRun(summary, engs, rec)


def _loop(
    requests: Iterable[SimRequest],
    router: Router,
    rec: Recorder,
    engs: list[VirtualEngine],
    scraped: list[ScrapedView],
    views: Sequence[EngineView],
    clock: _Clock,
    next_scrape: float,
    scrape_interval: float,
    warmup: float,
) -> None:
    engines = len(engs)
    track = bool(router.needs_completions)
    wakes: list[tuple[float, int]] = []
    wake_at = [math.inf] * engines
    outbox = rec.outbox
    on_complete = router.on_complete
    route = router.route

    def deliver() -> None:
        for sim, i in outbox:
            on_complete(sim, i)
        outbox.clear()

    def schedule(i: int) -> None:
        w = engs[i].next_wake()
        if w != wake_at[i]:
            wake_at[i] = w
            if w != math.inf:
                heapq.heappush(wakes, (w, i))

    def wake_until(t: float) -> None:
        while wakes and wakes[0][0] <= t:
            tw, i = heapq.heappop(wakes)
            if tw != wake_at[i]:
                continue
            wake_at[i] = math.inf
            # Inclusive: a step that *starts* at tw is planned too, so the next wake is strictly later.
            engs[i].advance(math.nextafter(tw, math.inf))
            if outbox:
                deliver()
            schedule(i)

    first = True
    last_t = -math.inf
    for req in requests:
        t = req.arrival
        if t < last_t:
            raise ValueError(f"request {req.request_id} arrives at {t} s, before the previous one ({last_t} s)")
        last_t = t
        if first and t >= warmup:
            rec.first_arrival = t
            first = False
        while next_scrape <= t:
            ts = next_scrape
            if track:
                wake_until(ts)
            for e, v in zip(engs, scraped, strict=True):
                e.advance(ts)
                v.waiting = e.num_waiting
                v.running = e.num_running
                v.kv_usage = e.kv_usage
                v.dispatched = 0
                v.scraped_at = ts
            next_scrape = ts + scrape_interval
        if track:
            wake_until(t)
            if outbox:
                deliver()
        clock.t = t
        i = route(req, views)
        try:
            engs[i].submit(req, t)
        except RejectedError:
            rec.rejected += 1
            continue
        rec.routed[i] += 1
        scraped[i].dispatched += 1
        if track:
            schedule(i)
    for e in engs:
        e.advance(math.inf)
    if outbox:
        deliver()


def _loop_fast(
    requests: Iterable[SimRequest],
    router: Router,
    rec: Recorder,
    engs: list[FastEngine],
    scraped: list[ScrapedView],
    views: Sequence[EngineView],
    clock: _Clock,
    next_scrape: float,
    scrape_interval: float,
    warmup: float,
) -> None:
    """:func:`_loop` for ``FastEngine`` (keep the two identical but for the type of ``engs``)."""
    engines = len(engs)
    track = bool(router.needs_completions)
    wakes: list[tuple[float, int]] = []
    wake_at = [math.inf] * engines
    outbox = rec.outbox
    on_complete = router.on_complete
    route = router.route

    def deliver() -> None:
        for sim, i in outbox:
            on_complete(sim, i)
        outbox.clear()

    def schedule(i: int) -> None:
        w = engs[i].next_wake()
        if w != wake_at[i]:
            wake_at[i] = w
            if w != math.inf:
                heapq.heappush(wakes, (w, i))

    def wake_until(t: float) -> None:
        while wakes and wakes[0][0] <= t:
            tw, i = heapq.heappop(wakes)
            if tw != wake_at[i]:
                continue
            wake_at[i] = math.inf
            # Inclusive: a step that *starts* at tw is planned too, so the next wake is strictly later.
            engs[i].advance(math.nextafter(tw, math.inf))
            if outbox:
                deliver()
            schedule(i)

    first = True
    last_t = -math.inf
    for req in requests:
        t = req.arrival
        if t < last_t:
            raise ValueError(f"request {req.request_id} arrives at {t} s, before the previous one ({last_t} s)")
        last_t = t
        if first and t >= warmup:
            rec.first_arrival = t
            first = False
        while next_scrape <= t:
            ts = next_scrape
            if track:
                wake_until(ts)
            for e, v in zip(engs, scraped, strict=True):
                e.advance(ts)
                v.waiting = e.num_waiting
                v.running = e.num_running
                v.kv_usage = e.kv_usage
                v.dispatched = 0
                v.scraped_at = ts
            next_scrape = ts + scrape_interval
        if track:
            wake_until(t)
            if outbox:
                deliver()
        clock.t = t
        i = route(req, views)
        try:
            engs[i].submit(req, t)
        except RejectedError:
            rec.rejected += 1
            continue
        rec.routed[i] += 1
        scraped[i].dispatched += 1
        if track:
            schedule(i)
    for e in engs:
        e.advance(math.inf)
    if outbox:
        deliver()
