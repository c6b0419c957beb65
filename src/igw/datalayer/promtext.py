"""A cheap reader of the Prometheus text format that looks only at the series it was asked for.

Scraping dozens of endpoints every 50 ms must stay cheap: a vLLM ``/metrics`` page has a few
hundred lines of which we need five. This reader jumps from one occurrence of a wanted name to
the next with ``str.find`` and parses only those lines, and their labels only for the series
that select on them. (prometheus-client's parser builds every family and sample; the tests use
it to cross-check this reader.)
"""

from __future__ import annotations

import math
import re

from igw.api.types import EndpointMetrics
from igw.datalayer.engines import EngineMetrics, Field, Source

_NAME_END = frozenset(("{", " ", "\t"))
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def parse_labels(text: str) -> dict[str, str]:
    """``a="1",b="x"`` -> dict (escapes kept as written; igw only reads plain values).

    Info-style series (``cache_config_info``) repeat the same long label text on every scrape,
    so parsed label sets are memoised (bounded); callers must not modify the result.
    """
    labels = _LABELS_MEMO.get(text)
    if labels is None:
        if len(_LABELS_MEMO) >= 4096:
            _LABELS_MEMO.clear()
        labels = _LABELS_MEMO[text] = dict(_LABEL.findall(text))
    return labels


_LABELS_MEMO: dict[str, dict[str, str]] = {}


class MetricsReader:
    """Turns one endpoint's exposition text into an :class:`EndpointMetrics` snapshot."""

    __slots__ = ("_by_name",)

    def __init__(self, engine: EngineMetrics) -> None:
        self._by_name: dict[str, tuple[Source, ...]] = engine.by_name()

    def read(self, text: str, *, now: float) -> EndpointMetrics:
        found: dict[Field, float] = {}
        for name, sources in self._by_name.items():
            # Jump from one occurrence of the name to the next (a C-speed scan) and look only at
            # the lines that start with it: the rest of the page is never split or parsed.
            size = len(name)
            at = text.find(name)
            while at != -1:
                after = at + size
                if (at == 0 or text[at - 1] == "\n") and text[after : after + 1] in _NAME_END:
                    eol = text.find("\n", after)
                    _read_sample(text[after : eol if eol != -1 else len(text)], sources, found)
                    if all(src.field in found for src in sources):
                        break
                at = text.find(name, after)
        return EndpointMetrics(
            waiting=found.get(Field.WAITING, 0.0),
            running=found.get(Field.RUNNING, 0.0),
            kv_usage=min(max(found.get(Field.KV_USAGE, 0.0), 0.0), 1.0),
            block_size=_int_or_none(found.get(Field.BLOCK_SIZE)),
            num_gpu_blocks=_int_or_none(found.get(Field.NUM_GPU_BLOCKS)),
            scraped_at=now,
        )


def _read_sample(rest: str, sources: tuple[Source, ...], found: dict[Field, float]) -> None:
    """``rest`` is a sample line after the metric name: ``{labels} value [timestamp]`` or `` value``."""
    labels: dict[str, str] | None = None
    if rest[:1] == "{":
        close = rest.rfind("}")
        if close < 0:
            return
        label_text, rest = rest[1:close], rest[close + 1 :]
    else:
        label_text = ""
    for src in sources:
        if src.field in found:
            continue
        if src.match or src.label:
            if labels is None:
                labels = parse_labels(label_text)
            if any(labels.get(k) != v for k, v in src.match):
                continue
        value = _number(labels.get(src.label) if labels is not None and src.label else rest.split()[:1])
        if value is not None:
            found[src.field] = value


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
