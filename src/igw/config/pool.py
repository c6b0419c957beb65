"""The static pool file: a YAML list of model-server endpoints for standalone mode.

::

    name: my-pool                 # optional, default "default"
    engine: vllm                  # vllm | sglang | trtllm-serve | triton-tensorrt-llm (default: the
                                  # endpoint's engine label, else the data layer's default engine)
    models: [llama-3-8b]          # optional: served model names (unknown models then get 404)
    endpoints:
      - 10.0.0.1:8000             # host:port, or a mapping with per-endpoint overrides:
      - {address: 10.0.0.2:8000, engine: sglang, models: [llama-3-8b], labels: {zone: a}}
    objectives:                   # optional: InferenceObjectives (header x-gateway-inference-objective)
      - {name: batch, priority: -1}   # below zero: shed with 429 while the pool is saturated
      - {name: chat, priority: 10}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from igw.api.types import Endpoint, Engine, format_address


class ConfigError(Exception):
    """A configuration file or flag is invalid; the message says where and why."""


class EndpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str
    engine: Engine | None = None
    models: list[str] | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        host, port = Endpoint.parse_address(value)
        return format_address(host, port)


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    priority: int = 0


class PoolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "default"
    engine: Engine | None = None
    models: list[str] | None = None
    endpoints: list[EndpointSpec] = Field(default_factory=list)
    objectives: list[ObjectiveSpec] = Field(default_factory=list)

    @field_validator("objectives")
    @classmethod
    def _unique_objectives(cls, value: list[ObjectiveSpec]) -> list[ObjectiveSpec]:
        names = [o.name for o in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"objective names must be unique: {', '.join(duplicates)}")
        return value

    def priorities(self) -> dict[str, int]:
        return {o.name: o.priority for o in self.objectives}

    @field_validator("endpoints", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"address": item} if isinstance(item, str) else item for item in value]
        return value

    def build(self) -> list[Endpoint]:
        """The endpoints, with pool-level defaults applied; duplicates are an error."""
        out: list[Endpoint] = []
        seen: set[str] = set()
        for spec in self.endpoints:
            if spec.address in seen:
                raise ConfigError(f"pool {self.name!r}: endpoint {spec.address} is listed twice")
            seen.add(spec.address)
            host, port = Endpoint.parse_address(spec.address)
            models = spec.models if spec.models is not None else self.models
            out.append(
                Endpoint(
                    address=spec.address,
                    host=host,
                    port=port,
                    engine=spec.engine or self.engine,
                    models=frozenset(models) if models is not None else None,
                    labels=tuple(sorted(spec.labels.items())),
                )
            )
        return out


def load_pool(path: str | Path) -> PoolSpec:
    """Read and validate a pool file; raise :class:`ConfigError` naming the file and field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read pool file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"pool file {path} is not valid YAML: {exc}") from exc
    return parse_pool(raw or {}, source=str(path))


def parse_pool(raw: Any, *, source: str = "pool") -> PoolSpec:
    try:
        spec = PoolSpec.model_validate(raw)
        spec.build()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc
    return spec


def pool_from_addresses(
    addresses: list[str],
    *,
    name: str = "default",
    engine: Engine | None = None,
    models: list[str] | None = None,
) -> PoolSpec:
    """The pool given by ``--endpoint`` flags."""
    return parse_pool(
        {"name": name, "engine": engine.value if engine else None, "models": models, "endpoints": addresses},
        source="--endpoint",
    )
