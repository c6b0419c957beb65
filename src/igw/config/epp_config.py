"""The ``EndpointPickerConfig`` file as written (phase 1 of loading: decode and check its shape).

The format is the reference EPP's (``apiVersion: inference.networking.x-k8s.io/v1alpha1``,
reference/gie-protocol.md §2), decoded strictly: unknown fields are errors, so a typo does
not silently change scheduling. Phase 2 (:mod:`igw.config.loader`) builds the plugins and
applies the defaulting rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from igw.config.pool import ConfigError

API_VERSIONS = (
    "inference.networking.x-k8s.io/v1alpha1",
    "config.x-k8s.io/v1alpha1",
    "config.apix.gateway-api-inference-extension.sigs.k8s.io/v1alpha1",
)
"""The scheme the reference code uses, then two spellings its documentation shows."""
KIND = "EndpointPickerConfig"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class PluginSpec(_Spec):
    name: str | None = None
    """Instance name; defaults to the type."""
    type: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class ProfilePluginRef(_Spec):
    plugin_ref: str = Field(min_length=1)
    weight: float | None = Field(default=None, ge=0)
    """Only meaningful for scorers; default 1.0."""


class ProfileSpec(_Spec):
    name: str = Field(min_length=1)
    plugins: list[ProfilePluginRef] = Field(default_factory=list)


class SaturationDetectorSpec(_Spec):
    plugin_ref: str | None = None
    # Inline fields of reference versions 1.2-1.4 (a utilization detector with these parameters).
    queue_depth_threshold: float | None = None
    kv_cache_util_threshold: float | None = None
    metrics_staleness_threshold: str | float | None = None

    def legacy_parameters(self) -> dict[str, Any]:
        fields = {
            "queueDepthThreshold": self.queue_depth_threshold,
            "kvCacheUtilThreshold": self.kv_cache_util_threshold,
            "metricsStalenessThreshold": self.metrics_staleness_threshold,
        }
        return {k: v for k, v in fields.items() if v is not None}


class PluginRef(_Spec):
    plugin_ref: str = Field(min_length=1)


class DataSourceSpec(_Spec):
    plugin_ref: str = Field(min_length=1)
    extractors: list[PluginRef] = Field(default_factory=list)


class DataLayerSpec(_Spec):
    sources: list[DataSourceSpec] = Field(default_factory=list)


class EndpointPickerConfigSpec(_Spec):
    api_version: str | None = None
    kind: str | None = None
    feature_gates: list[str] = Field(default_factory=list)
    plugins: list[PluginSpec] = Field(default_factory=list)
    scheduling_profiles: list[ProfileSpec] = Field(default_factory=list)
    saturation_detector: SaturationDetectorSpec | None = None
    data_layer: DataLayerSpec | None = Field(default=None, validation_alias=AliasChoices("dataLayer", "data"))
    """``data`` in reference versions 1.3-1.4."""
    flow_control: dict[str, Any] | None = None
    parser: PluginRef | None = None

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, value: str | None) -> str | None:
        if value is not None and value not in API_VERSIONS:
            raise ValueError(f"unsupported apiVersion {value!r}; use {API_VERSIONS[0]}")
        return value

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str | None) -> str | None:
        if value is not None and value != KIND:
            raise ValueError(f"kind must be {KIND}, not {value!r}")
        return value


def decode(text: str, *, source: str = "configuration") -> EndpointPickerConfigSpec:
    """YAML (or JSON) text -> the checked file structure; errors name the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping (apiVersion, kind, plugins, ...)")
    try:
        return EndpointPickerConfigSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_problems(exc)}") from None


def read(path: str | Path) -> EndpointPickerConfigSpec:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    return decode(text, source=str(path))


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(f"{loc}: {msg}")
    return "; ".join(out)
