"""Shared formula: min-max normalised "lower is better" scores."""

from __future__ import annotations

from collections.abc import Sequence


def lower_is_better(values: Sequence[float]) -> list[float]:
    """``(max - v) / (max - min)``; all equal gives 1.0 for everyone."""
    hi, lo = max(values), min(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
