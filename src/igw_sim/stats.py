"""Plain counters and histograms kept by the engine (no Prometheus dependency here).

``metrics.py`` turns these into Prometheus families at scrape time; keeping the engine free of
``prometheus_client`` lets it be tested, and read by ``/sim/stats``, without a registry.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = [
    "E2E_BUCKETS",
    "ITL_BUCKETS",
    "QUEUE_BUCKETS",
    "TTFT_BUCKETS",
    "Histogram",
]

# Bucket bounds as in vLLM's v1 metrics (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
QUEUE_BUCKETS = E2E_BUCKETS


@dataclass(slots=True)
class Histogram:
    """A cumulative-on-read histogram.

    ``counts[i]`` is the number of observations in ``(bounds[i-1], bounds[i]]``; the last slot (index
    ``len(bounds)``) holds observations above every bound (the ``+Inf`` bucket).
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError("histogram bounds must be sorted")
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Record one observation (seconds)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs in Prometheus order, ending with ``("+Inf", count)``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out
