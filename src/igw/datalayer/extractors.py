"""``core-metrics-extractor``: which engine's metric names apply to an endpoint, and the specs.

Parameters (reference/gie-protocol.md §3):

* ``engineLabelKey`` (default ``inference.networking.k8s.io/engine-type``): the endpoint label
  that names its engine.
* ``defaultEngine`` (default ``vllm``): the engine of endpoints that name none, or an unknown one.
* ``engineConfigs``: ``[{name, queuedRequestsSpec, runningRequestsSpec, kvUsageSpec, loraSpec,
  cacheInfoSpec, cacheBlockSizeLabelName, cacheNumBlocksLabelName, cacheBlockSizeSpec,
  cacheNumBlocksSpec}]``. Specs are PromQL selectors (``name{label=value}``; ``""`` disables the
  signal). An entry named like a built-in (``vllm``, ``sglang``, ``trtllm-serve``,
  ``triton-tensorrt-llm``) replaces it entirely: fields are not merged. ``default`` is reserved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import field_validator

from igw.api.types import Endpoint, Engine
from igw.datalayer.engines import BUILTIN_ENGINES, EngineConfig, parse_spec
from igw.framework.plugin import Handle, Plugin, PluginParams
from igw.framework.registry import register

log = logging.getLogger("igw.datalayer")

DEFAULT_ENGINE_LABEL_KEY = "inference.networking.k8s.io/engine-type"
RESERVED_ENGINE_NAME = "default"


class EngineConfigParams(PluginParams):
    name: str
    queued_requests_spec: str = ""
    running_requests_spec: str = ""
    kv_usage_spec: str = ""
    lora_spec: str = ""
    cache_info_spec: str = ""
    cache_block_size_label_name: str = ""
    """Label of ``cacheInfoSpec`` holding the block size (default ``block_size``)."""
    cache_num_blocks_label_name: str = ""
    """Label of ``cacheInfoSpec`` holding the number of KV blocks (default ``num_gpu_blocks``)."""
    cache_block_size_spec: str = ""
    """A series whose value is the block size (instead of a ``cacheInfoSpec`` label)."""
    cache_num_blocks_spec: str = ""

    @field_validator(
        "queued_requests_spec",
        "running_requests_spec",
        "kv_usage_spec",
        "lora_spec",
        "cache_info_spec",
        "cache_block_size_spec",
        "cache_num_blocks_spec",
    )
    @classmethod
    def _valid_spec(cls, value: str) -> str:
        parse_spec(value)  # a ValueError names the problem; pydantic adds where
        return value

    def to_config(self) -> EngineConfig:
        return EngineConfig.from_specs(**self.model_dump(by_alias=False))


class ExtractorParams(PluginParams):
    engine_label_key: str = DEFAULT_ENGINE_LABEL_KEY
    default_engine: str = Engine.VLLM.value
    engine_configs: tuple[EngineConfigParams, ...] = ()


@register
class CoreMetricsExtractor(Plugin):
    """Maps each endpoint to an :class:`EngineConfig`: label, else declared engine, else default."""

    type_name = "core-metrics-extractor"
    Params = ExtractorParams

    def __init__(
        self,
        name: str | None = None,
        *,
        engine_label_key: str = DEFAULT_ENGINE_LABEL_KEY,
        default_engine: str = Engine.VLLM.value,
        engine_configs: Iterable[EngineConfig] = (),
    ) -> None:
        super().__init__(name)
        if not engine_label_key:
            raise ValueError("engineLabelKey must not be empty")
        engines = dict(BUILTIN_ENGINES)
        user: set[str] = set()
        for config in engine_configs:
            if config.name == RESERVED_ENGINE_NAME:
                raise ValueError(f"engine config name {RESERVED_ENGINE_NAME!r} is reserved")
            if config.name in user:
                raise ValueError(f"engine config {config.name!r} is given twice")
            user.add(config.name)
            engines[config.name] = config
        if default_engine not in engines:
            raise ValueError(f"defaultEngine {default_engine!r} is not a known engine; known: {', '.join(engines)}")
        self.engine_label_key = engine_label_key
        self.default_engine = default_engine
        self.engines: Mapping[str, EngineConfig] = engines
        """Every engine this extractor knows (built-ins, replaced or not, then user additions)."""
        self._warned: set[str] = set()

    @classmethod
    def from_params(cls, name: str, params: ExtractorParams, handle: Handle) -> CoreMetricsExtractor:
        return cls(
            name,
            engine_label_key=params.engine_label_key,
            default_engine=params.default_engine,
            engine_configs=[entry.to_config() for entry in params.engine_configs],
        )

    def describe(self) -> Mapping[str, Any]:
        return {
            "engineLabelKey": self.engine_label_key,
            "defaultEngine": self.default_engine,
            "engineConfigs": [config.specs() for config in self.engines.values()],
        }

    def engine_for(self, endpoint: Endpoint) -> EngineConfig:
        """The endpoint's engine label, else the engine its pool declares, else ``defaultEngine``.

        A name no config has falls back to ``defaultEngine``, with one warning per name.
        """
        name = endpoint.engine
        for key, value in endpoint.labels:
            if key == self.engine_label_key and value:
                name = value
                break
        if not name:
            return self.engines[self.default_engine]
        config = self.engines.get(name)
        if config is None:
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "endpoint %s: unknown engine %r, reading it as %r (known engines: %s)",
                    endpoint.address,
                    name,
                    self.default_engine,
                    ", ".join(self.engines),
                )
            config = self.engines[self.default_engine]
        return config
