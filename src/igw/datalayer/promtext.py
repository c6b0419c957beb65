"""A cheap reader of the Prometheus text format that looks only at the series it was asked for.

Scraping dozens of endpoints every 50 ms must stay cheap: a vLLM ``/metrics`` page has a few
hundred lines of which we need five. This reader skips a line after looking at its name, and
parses labels only for the series that select on them. (prometheus-client's parser builds
every family and sample; the tests use it to cross-check this reader.)
"""

from __future__ import annotations

import math
import re

from igw.api.types import EndpointMetrics
from igw.datalayer.engines import EngineMetrics, Field, Source

_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def parse_labels(text: str) -> dict[str, str]:
    """``a="1",b="x"`` -> dict (escapes kept as written; igw only reads plain values)."""
    return dict(_LABEL.findall(text))


class MetricsReader:
    """Turns one endpoint's exposition text into an :class:`EndpointMetrics` snapshot."""

    __slots__ = ("_by_name",)

    def __init__(self, engine: EngineMetrics) -> None:
        self._by_name: dict[str, tuple[Source, ...]] = engine.by_name()

    def read(self, text: str, *, now: float) -> EndpointMetrics:
        found: dict[Field, float] = {}
        by_name = self._by_name
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            brace = line.find("{")
            space = line.find(" ")
            tab = line.find("\t")
            if tab != -1 and (space == -1 or tab < space):
                space = tab
            end = brace if brace != -1 and (space == -1 or brace < space) else space
            if end <= 0:
                continue
            sources = by_name.get(line[:end])
            if sources is None:
                continue
            labels: dict[str, str] | None = None
            if end == brace:
                close = line.rfind("}")
                if close < 0:
                    continue
                label_text, rest = line[brace + 1 : close], line[close + 1 :]
            else:
                label_text, rest = "", line[end:]
            for src in sources:
                if src.field in found:
                    continue
                if src.match or src.label:
                    if labels is None:
                        labels = parse_labels(label_text)
                    if any(labels.get(k) != v for k, v in src.match):
                        continue
                raw = (labels or {}).get(src.label) if src.label else rest.split()[:1]
                value = _number(raw)
                if value is not None:
                    found[src.field] = value
        return EndpointMetrics(
            waiting=found.get(Field.WAITING, 0.0),
            running=found.get(Field.RUNNING, 0.0),
            kv_usage=min(max(found.get(Field.KV_USAGE, 0.0), 0.0), 1.0),
            block_size=_int_or_none(found.get(Field.BLOCK_SIZE)),
            num_gpu_blocks=_int_or_none(found.get(Field.NUM_GPU_BLOCKS)),
            scraped_at=now,
        )


def _number(raw: str | list[str] | None) -> float | None:
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _int_or_none(value: float | None) -> int | None:
    return int(value) if value is not None and value > 0 else None
