"""What a replay measures: per-request latencies, per-engine shares, and the summary of one policy.

:class:`Recorder` is filled by the virtual-time engines as requests finish (arrays of floats, so that
millions of requests cost a few tens of MB). :meth:`Recorder.summary` turns it into a
:class:`PolicySummary`, the row of one policy in the comparison table.

Definitions (all in simulated seconds):

* TTFT = first token - arrival; e2e = last token - arrival; ITL = (e2e - TTFT) / (output - 1), per
  request with more than one output token, then averaged.
* Output tokens/s = every generated token / (last finish - first arrival).
* Prefix hit rate = prompt tokens found in the engines' prefix caches at each request's first scheduling
  / prompt tokens (vLLM's ``prefix_cache_hits_total / prefix_cache_queries_total``).
* With a warm-up (``measure_from``), only requests that arrive after it are measured; the throughput
  span starts at the first of them.
* Share = requests routed to an engine / requests routed; hotspot = engines x the largest share (1.0 is
  a perfect spread).
* Max queue = the longest waiting queue any engine had when a request was routed to it.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import asdict, dataclass
from typing import Any

from igw_sim.replay.requests import SimRequest

__all__ = ["PolicySummary", "Recorder", "RequestOutcome", "percentile"]


def percentile(sorted_values: array[float] | list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in ``[0, 100]`` of already sorted values (``nan`` when empty)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(math.ceil(q / 100.0 * n), 1)
    return sorted_values[min(rank, n) - 1]


class Recorder:
    """Collects the outcome of every request of one replay."""

    def __init__(
        self, engines: int, *, track_completions: bool = False, keep_requests: bool = False, measure_from: float = 0.0
    ) -> None:
        self.engines = engines
        self.ttft: array[float] = array("d")
        self.e2e: array[float] = array("d")
        self.itl: array[float] = array("d")
        self.completed = 0
        self.rejected = 0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.measure_from = measure_from
        """Requests that arrive earlier (the warm-up) are simulated but not measured."""
        self.first_arrival = math.inf
        self.last_finish = 0.0
        self.routed = [0] * engines
        self.max_waiting = [0] * engines
        self.track_completions = track_completions
        self.outbox: list[tuple[SimRequest, int]] = []
        """Finished requests not yet reported to the router (only with ``track_completions``)."""
        self.requests: dict[int, RequestOutcome] | None = {} if keep_requests else None
        """Every request's outcome by id (only with ``keep_requests``; for tests)."""

    def finish(self, request: SimRequest, engine: int, first_token: float, end: float, cached: int) -> None:
        """A request generated its last token at ``end``; ``cached`` prompt tokens hit at first scheduling."""
        if self.track_completions:
            self.outbox.append((request, engine))
        arrival = request.arrival
        if arrival < self.measure_from:
            return
        if self.requests is not None:
            self.requests[request.request_id] = RequestOutcome(engine, first_token - arrival, end - arrival, cached)
        self.ttft.append(first_token - arrival)
        self.e2e.append(end - arrival)
        out = request.output_tokens
        if out > 1:
            self.itl.append((end - first_token) / (out - 1))
        self.completed += 1
        self.output_tokens += out
        self.prompt_tokens += request.prompt_tokens
        self.cached_tokens += cached
        if end > self.last_finish:
            self.last_finish = end

    def summary(self, *, policy: str, preemptions: int, wall_s: float) -> PolicySummary:
        ttft = sorted(self.ttft)
        e2e = sorted(self.e2e)
        routed = sum(self.routed)
        span = self.last_finish - self.first_arrival if self.completed else 0.0
        shares = [n / routed for n in self.routed] if routed else [0.0] * self.engines
        return PolicySummary(
            policy=policy,
            requests=routed + self.rejected,
            completed=self.completed,
            rejected=self.rejected,
            ttft_p50=percentile(ttft, 50),
            ttft_p90=percentile(ttft, 90),
            ttft_p99=percentile(ttft, 99),
            ttft_mean=sum(ttft) / len(ttft) if ttft else math.nan,
            e2e_p50=percentile(e2e, 50),
            e2e_p90=percentile(e2e, 90),
            e2e_p99=percentile(e2e, 99),
            itl_mean=sum(self.itl) / len(self.itl) if self.itl else math.nan,
            output_tokens_per_s=self.output_tokens / span if span > 0 else math.nan,
            prefix_hit_rate=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            share_min=min(shares),
            share_max=max(shares),
            hotspot=max(shares) * self.engines,
            max_queue=max(self.max_waiting),
            preemptions=preemptions,
            makespan_s=span,
            wall_s=wall_s,
            requests_per_wall_s=(routed + self.rejected) / wall_s if wall_s > 0 else math.nan,
            shares=shares,
        )


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    engine: int
    ttft: float
    e2e: float
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class PolicySummary:
    """One policy's results on one workload (times in simulated seconds, except ``wall_s``)."""

    policy: str
    requests: int
    completed: int
    rejected: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    ttft_mean: float
    e2e_p50: float
    e2e_p90: float
    e2e_p99: float
    itl_mean: float
    output_tokens_per_s: float
    prefix_hit_rate: float
    share_min: float
    share_max: float
    hotspot: float
    max_queue: int
    preemptions: int
    makespan_s: float
    wall_s: float
    requests_per_wall_s: float
    shares: list[float]

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}
