"""A cheap reader of the Prometheus text format that looks only at the series it was asked for.

Scraping dozens of endpoints every 50 ms must stay cheap: a vLLM ``/metrics`` page has a few
hundred lines of which we need a handful. This reader jumps from one occurrence of a wanted name to
the next with ``str.find`` and parses only those lines, and their labels only for the series
that select on them. (prometheus-client's parser builds every family and sample; the tests use
it to cross-check this reader.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import lru_cache

from igw.api.types import EndpointMetrics
from igw.datalayer.engines import EngineConfig, Field, Source

_NAME_END = frozenset(("{", " ", "\t"))
# Enum members as module globals: ``Field.X`` is an ~80 ns class attribute lookup, and this
# module's loops run for every wanted line of every scrape.
_WAITING, _RUNNING, _KV_USAGE = Field.WAITING, Field.RUNNING, Field.KV_USAGE
_BLOCK_SIZE, _NUM_GPU_BLOCKS, _LORA = Field.BLOCK_SIZE, Field.NUM_GPU_BLOCKS, Field.LORA
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
    """Turns one endpoint's exposition text into an :class:`EndpointMetrics` snapshot.

    Which series counts when several match a spec: for the LoRA info series, the one with the
    largest value (its value is the time of its last update, so the newest; ties: the first).
    For every other signal, the first matching series with a finite value. (GIE takes the
    series with the newest sample timestamp; model servers write no timestamps, so that is the
    first series there too, and reading on would cost a scan of the whole page per signal.)
    A signal with several specs (vLLM's legacy KV-usage name) reads a later spec only when no
    earlier one had a sample.
    """

    __slots__ = ("_lora", "_plan")

    def __init__(self, engine: EngineConfig) -> None:
        by_name: dict[str, list[Source]] = {}
        for src in engine.sources():
            by_name.setdefault(src.metric, []).append(src)
        plan: list[tuple[str, tuple[Source, ...], tuple[Field, ...], bool]] = []
        seen: set[Field] = set()
        for name, srcs in by_name.items():
            fields = tuple(dict.fromkeys(s.field for s in srcs))
            # ``fields``: once all are found, the scan of this name stops (never for LoRA: every
            # series must be seen to find the newest). ``fallback``: some field has a source
            # under an earlier name, so the scan may be skipped altogether.
            plan.append((name, tuple(srcs), () if Field.LORA in fields else fields, not seen.isdisjoint(fields)))
            seen.update(fields)
        self._plan = tuple(plan)
        self._lora = Field.LORA in seen

    def read(self, text: str, *, now: float) -> EndpointMetrics:
        found: dict[Field, float] = {}
        lora = _Newest() if self._lora else _NO_NEWEST
        for name, sources, fields, fallback in self._plan:
            if fallback and _all_found(fields, found):
                continue  # e.g. vLLM's legacy KV name when the new one had a sample: no scan at all
            # Jump from one occurrence of the name to the next (a C-speed scan) and look only at
            # the lines that start with it: the rest of the page is never split or parsed.
            size = len(name)
            at = text.find(name)
            while at != -1:
                after = at + size
                if (at == 0 or text[at - 1] == "\n") and text[after : after + 1] in _NAME_END:
                    eol = text.find("\n", after)
                    _read_sample(text[after : eol if eol != -1 else len(text)], sources, found, lora)
                    if fields and _all_found(fields, found):
                        break
                at = text.find(name, after)
        max_lora, running_adapters, waiting_adapters = _NO_LORA if lora.labels is None else lora_info(lora.labels)
        return EndpointMetrics(
            waiting=found.get(_WAITING, 0.0),
            running=found.get(_RUNNING, 0.0),
            kv_usage=min(max(found.get(_KV_USAGE, 0.0), 0.0), 1.0),
            block_size=_int_or_none(found.get(_BLOCK_SIZE)),
            num_gpu_blocks=_int_or_none(found.get(_NUM_GPU_BLOCKS)),
            scraped_at=now,
            max_lora=max_lora,
            running_adapters=running_adapters,
            waiting_adapters=waiting_adapters,
        )


def _all_found(fields: tuple[Field, ...], found: dict[Field, float]) -> bool:
    for field in fields:  # noqa: SIM110  (a generator in all() costs more on this path)
        if field not in found:
            return False
    return True


class _Newest:
    """The labels of the series with the largest value so far."""

    __slots__ = ("labels", "value")

    def __init__(self) -> None:
        self.value = -math.inf
        self.labels: dict[str, str] | None = None


_NO_NEWEST = _Newest()
"""Shared by readers without a LoRA spec: nothing ever writes to it."""


def _read_sample(rest: str, sources: tuple[Source, ...], found: dict[Field, float], lora: _Newest) -> None:
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
        field = src.field
        if field in found:
            continue
        if src.match or src.label or field is _LORA:
            if labels is None:
                labels = parse_labels(label_text)
            if any(labels.get(k, "") != v for k, v in src.match):  # PromQL: "" matches a missing label
                continue
        if field is _LORA:
            value = _number(rest.split()[:1])
            if value is not None and value > lora.value:
                lora.value, lora.labels = value, labels
            continue
        value = _number(labels.get(src.label) if labels is not None and src.label else rest.split()[:1])
        if value is not None:
            found[field] = value


LoraInfo = tuple[int | None, frozenset[str], frozenset[str]]
_NO_LORA: LoraInfo = (None, frozenset(), frozenset())


def lora_info(labels: Mapping[str, str]) -> LoraInfo:
    """``(max_lora, running, waiting)`` from a ``lora_requests_info`` series' labels.

    ``max_lora`` is a non-negative integer, else ``None``; the adapter lists are
    comma-separated, names trimmed, empty items dropped; a missing label is an empty list.
    """
    try:
        max_lora: int | None = int(labels.get("max_lora", ""))
    except ValueError:
        max_lora = None
    if max_lora is not None and max_lora < 0:
        max_lora = None
    return (
        max_lora,
        _adapters(labels.get("running_lora_adapters", "")),
        _adapters(labels.get("waiting_lora_adapters", "")),
    )


@lru_cache(maxsize=1024)
def _adapters(csv: str) -> frozenset[str]:
    return frozenset(name for item in csv.split(",") if (name := item.strip()))


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
