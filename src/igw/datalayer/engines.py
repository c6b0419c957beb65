"""Which Prometheus series carry queue depth, running requests, KV use, cache size and LoRA state.

An engine config names one series per signal with a *metric spec*: a PromQL instant selector
``name{label=value,...}`` (reference/gie-protocol.md §3). The built-in configs follow the Model
Server Protocol table; ``core-metrics-extractor`` lets users add engines or replace a built-in
(:mod:`igw.datalayer.extractor`). :meth:`EngineConfig.sources` compiles a config into the flat
:class:`Source` list that :class:`~igw.datalayer.promtext.MetricsReader` scans for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

from igw.api.types import Engine


class Field(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    KV_USAGE = "kv_usage"
    BLOCK_SIZE = "block_size"
    NUM_GPU_BLOCKS = "num_gpu_blocks"
    LORA = "lora"
    """The LoRA info series itself: the reader keeps the one with the largest value (newest)."""


# -- metric specs ------------------------------------------------------------------------------

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNQUOTED_VALUE = re.compile(r"""[^\s,{}"'`=!~]+""")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One series selector: ``name`` plus label equality matchers (values unescaped).

    As in PromQL, a matcher with an empty value also matches series without that label.
    """

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        matchers = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in self.labels)
        return f"{self.name}{{{matchers}}}"


def parse_spec(text: str) -> MetricSpec | None:
    """Parse a PromQL instant selector ``name{label=value,...}``; ``""`` (disabled) gives ``None``.

    Values may be double-, single- or back-quoted (PromQL strings) or bare words. Only the
    equality matcher ``=`` is supported. Raises :class:`ValueError` saying what is wrong where.
    """
    spec = text.strip()
    if not spec:
        return None
    name_match = _METRIC_NAME.match(spec)
    if name_match is None:
        raise ValueError(f"metric spec {text!r}: expected a metric name at the start")
    name = name_match.group()
    pos = _skip_space(spec, name_match.end())
    labels: dict[str, str] = {}
    if pos < len(spec):
        if spec[pos] != "{":
            raise ValueError(f"metric spec {text!r}: unexpected {spec[pos:]!r} after the metric name")
        pos = _skip_space(spec, pos + 1)
        while pos < len(spec) and spec[pos] != "}":
            label_match = _LABEL_NAME.match(spec, pos)
            if label_match is None:
                raise ValueError(f"metric spec {text!r}: expected a label name at {spec[pos:]!r}")
            label = label_match.group()
            pos = _skip_space(spec, label_match.end())
            if spec.startswith(("!=", "=~", "!~"), pos):
                raise ValueError(f"metric spec {text!r}: only '=' matchers are supported, not {spec[pos : pos + 2]!r}")
            if not spec.startswith("=", pos):
                raise ValueError(f"metric spec {text!r}: expected '=' after label {label!r}")
            value, pos = _value(spec, _skip_space(spec, pos + 1), text, label)
            if label in labels:
                raise ValueError(f"metric spec {text!r}: label {label!r} is given twice")
            labels[label] = value
            pos = _skip_space(spec, pos)
            if spec.startswith(",", pos):
                pos = _skip_space(spec, pos + 1)
            elif pos < len(spec) and spec[pos] != "}":
                raise ValueError(f"metric spec {text!r}: expected ',' or '}}' after the value of {label!r}")
        if pos >= len(spec):
            raise ValueError(f"metric spec {text!r}: missing '}}'")
        if spec[pos + 1 :].strip():
            raise ValueError(f"metric spec {text!r}: unexpected {spec[pos + 1 :]!r} after '}}'")
    return MetricSpec(name, tuple(labels.items()))


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _value(spec: str, pos: int, text: str, label: str) -> tuple[str, int]:
    """The label value at ``pos`` (quoted or bare) and the position after it."""
    quote = spec[pos : pos + 1]
    if quote == "`":  # raw string: no escapes
        end = spec.find("`", pos + 1)
        if end < 0:
            raise ValueError(f"metric spec {text!r}: unterminated value of {label!r}")
        return spec[pos + 1 : end], end + 1
    if quote in ('"', "'"):
        out: list[str] = []
        i = pos + 1
        while i < len(spec):
            char = spec[i]
            if char == quote:
                return "".join(out), i + 1
            if char == "\\":
                escaped = _ESCAPES.get(spec[i + 1 : i + 2])
                if escaped is None:
                    raise ValueError(f"metric spec {text!r}: bad escape {spec[i : i + 2]!r} in the value of {label!r}")
                out.append(escaped)
                i += 2
                continue
            out.append(char)
            i += 1
        raise ValueError(f"metric spec {text!r}: unterminated value of {label!r}")
    bare = _UNQUOTED_VALUE.match(spec, pos)
    if bare is None:
        raise ValueError(f"metric spec {text!r}: missing value for label {label!r}")
    return bare.group(), bare.end()


def escape_label_value(value: str) -> str:
    """A label value as both PromQL strings and the exposition format write it (``\\\\``, ``\\"``, ``\\n``)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- engine configs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """``metric{match...}`` gives ``field``: its value, or the value of ``label`` if set.

    ``match`` values are written as in the exposition text (escaped), ready to compare with
    what :func:`~igw.datalayer.promtext.parse_labels` returns.
    """

    field: Field
    metric: str
    match: tuple[tuple[str, str], ...] = ()
    label: str | None = None


DEFAULT_METRICS_PATH = "/metrics"
METRICS_PATHS: Mapping[str, str] = MappingProxyType({Engine.TRTLLM_SERVE.value: "/prometheus/metrics"})
"""Where each engine serves its metrics when it is not ``/metrics`` (by engine name)."""

DEFAULT_BLOCK_SIZE_LABEL = "block_size"
DEFAULT_NUM_BLOCKS_LABEL = "num_gpu_blocks"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The metric specs of one engine kind. ``None`` disables a signal.

    Cache size comes either from labels of an info-style series (``cache_info`` with the two
    label names) or from the values of two series (``cache_block_size``, ``cache_num_blocks``);
    a value spec, when set, wins over the info label for its signal.
    """

    name: str
    queued: tuple[MetricSpec, ...] = ()
    """Specs tried in order (also for ``running`` and ``kv_usage``): a later one is read only
    when no earlier one had a sample. From spec strings there is one; built-ins may add more."""
    running: tuple[MetricSpec, ...] = ()
    kv_usage: tuple[MetricSpec, ...] = ()
    lora: MetricSpec | None = None
    cache_info: MetricSpec | None = None
    cache_block_size_label: str = DEFAULT_BLOCK_SIZE_LABEL
    cache_num_blocks_label: str = DEFAULT_NUM_BLOCKS_LABEL
    cache_block_size: MetricSpec | None = None
    cache_num_blocks: MetricSpec | None = None
    metrics_path: str = DEFAULT_METRICS_PATH

    @classmethod
    def from_specs(
        cls,
        name: str,
        *,
        queued_requests_spec: str = "",
        running_requests_spec: str = "",
        kv_usage_spec: str = "",
        lora_spec: str = "",
        cache_info_spec: str = "",
        cache_block_size_label_name: str = "",
        cache_num_blocks_label_name: str = "",
        cache_block_size_spec: str = "",
        cache_num_blocks_spec: str = "",
    ) -> EngineConfig:
        """Build a config from spec strings (the ``engineConfigs`` entry of the extractor).

        Raises :class:`ValueError` naming the engine and the field at fault.
        """
        if not name.strip():
            raise ValueError("engine config name must not be empty")

        def spec(field: str, text: str) -> MetricSpec | None:
            try:
                return parse_spec(text)
            except ValueError as exc:
                raise ValueError(f"engine {name!r}: {field}: {exc}") from None

        cache_info = spec("cacheInfoSpec", cache_info_spec)
        block_size = spec("cacheBlockSizeSpec", cache_block_size_spec)
        num_blocks = spec("cacheNumBlocksSpec", cache_num_blocks_spec)
        for label_field, label, value_spec in (
            ("cacheBlockSizeLabelName", cache_block_size_label_name, block_size),
            ("cacheNumBlocksLabelName", cache_num_blocks_label_name, num_blocks),
        ):
            if not label:
                continue
            if cache_info is None:
                raise ValueError(f"engine {name!r}: {label_field} needs cacheInfoSpec")
            if value_spec is not None:
                raise ValueError(f"engine {name!r}: give {label_field} or the matching value spec, not both")
            if _LABEL_NAME.fullmatch(label) is None:
                raise ValueError(f"engine {name!r}: {label_field} {label!r} is not a label name")
        return cls(
            name=name,
            queued=_some(spec("queuedRequestsSpec", queued_requests_spec)),
            running=_some(spec("runningRequestsSpec", running_requests_spec)),
            kv_usage=_some(spec("kvUsageSpec", kv_usage_spec)),
            lora=spec("loraSpec", lora_spec),
            cache_info=cache_info,
            cache_block_size_label=cache_block_size_label_name or DEFAULT_BLOCK_SIZE_LABEL,
            cache_num_blocks_label=cache_num_blocks_label_name or DEFAULT_NUM_BLOCKS_LABEL,
            cache_block_size=block_size,
            cache_num_blocks=num_blocks,
            metrics_path=METRICS_PATHS.get(name, DEFAULT_METRICS_PATH),
        )

    def specs(self) -> dict[str, str]:
        """The config as ``engineConfigs`` spec strings (first spec of each signal)."""
        out = {
            "name": self.name,
            "queuedRequestsSpec": _text(self.queued[:1]),
            "runningRequestsSpec": _text(self.running[:1]),
            "kvUsageSpec": _text(self.kv_usage[:1]),
            "loraSpec": _text(_some(self.lora)),
            "cacheInfoSpec": _text(_some(self.cache_info)),
        }
        if self.cache_info is not None:
            if self.cache_block_size is None:
                out["cacheBlockSizeLabelName"] = self.cache_block_size_label
            if self.cache_num_blocks is None:
                out["cacheNumBlocksLabelName"] = self.cache_num_blocks_label
        out["cacheBlockSizeSpec"] = _text(_some(self.cache_block_size))
        out["cacheNumBlocksSpec"] = _text(_some(self.cache_num_blocks))
        return out

    def sources(self) -> tuple[Source, ...]:
        """The flat list the reader scans for, in priority order within each field."""
        out: list[Source] = []

        def add(field: Field, specs: tuple[MetricSpec, ...], label: str | None = None) -> None:
            out.extend(
                Source(field, s.name, tuple((k, escape_label_value(v)) for k, v in s.labels), label) for s in specs
            )

        add(Field.WAITING, self.queued)
        add(Field.RUNNING, self.running)
        add(Field.KV_USAGE, self.kv_usage)
        if self.cache_block_size is not None:
            add(Field.BLOCK_SIZE, (self.cache_block_size,))
        elif self.cache_info is not None:
            add(Field.BLOCK_SIZE, (self.cache_info,), self.cache_block_size_label)
        if self.cache_num_blocks is not None:
            add(Field.NUM_GPU_BLOCKS, (self.cache_num_blocks,))
        elif self.cache_info is not None:
            add(Field.NUM_GPU_BLOCKS, (self.cache_info,), self.cache_num_blocks_label)
        add(Field.LORA, _some(self.lora))
        return tuple(out)


def _some(spec: MetricSpec | None) -> tuple[MetricSpec, ...]:
    return () if spec is None else (spec,)


def _text(specs: tuple[MetricSpec, ...]) -> str:
    return str(specs[0]) if specs else ""


def _builtin(name: Engine, *, kv_usage_fallback: str = "", **specs: str) -> EngineConfig:
    config = EngineConfig.from_specs(name.value, **specs)
    fallback = parse_spec(kv_usage_fallback)
    if fallback is not None:
        config = replace(config, kv_usage=(*config.kv_usage, fallback))
    return config


BUILTIN_ENGINES: Mapping[str, EngineConfig] = MappingProxyType(
    {
        config.name: config
        for config in (
            _builtin(
                Engine.VLLM,
                queued_requests_spec="vllm:num_requests_waiting",
                running_requests_spec="vllm:num_requests_running",
                kv_usage_spec="vllm:kv_cache_usage_perc",
                kv_usage_fallback="vllm:gpu_cache_usage_perc",  # vLLM before 0.10 (GIE v1.0.x default)
                lora_spec="vllm:lora_requests_info",
                cache_info_spec="vllm:cache_config_info",
            ),
            _builtin(
                Engine.SGLANG,
                queued_requests_spec="sglang:num_queue_reqs",
                running_requests_spec="sglang:num_running_reqs",
                kv_usage_spec="sglang:token_usage",
                cache_info_spec="sglang:cache_config_info",
                cache_block_size_label_name="page_size",
                cache_num_blocks_label_name="num_pages",
            ),
            _builtin(
                Engine.TRTLLM_SERVE,
                queued_requests_spec="trtllm_num_requests_waiting",
                running_requests_spec="trtllm_num_requests_running",
                kv_usage_spec="trtllm_kv_cache_utilization",
                cache_block_size_spec="trtllm_kv_cache_tokens_per_block",
                cache_num_blocks_spec="trtllm_kv_cache_max_blocks",
            ),
            _builtin(
                Engine.TRITON_TENSORRT_LLM,
                queued_requests_spec="nv_trt_llm_request_metrics{request_type=waiting}",
                running_requests_spec="nv_trt_llm_request_metrics{request_type=scheduled}",
                kv_usage_spec="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
                cache_block_size_spec="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
                cache_num_blocks_spec="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}",
            ),
        )
    }
)
"""The engines every extractor knows, by name; a user ``engineConfigs`` entry of the same name
replaces one entirely. The built-in ``vllm`` also reads ``vllm:gpu_cache_usage_perc`` when
``vllm:kv_cache_usage_perc`` has no sample (vLLM before 0.10)."""
