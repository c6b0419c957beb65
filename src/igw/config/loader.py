"""Phase 2 of loading an ``EndpointPickerConfig``: build the plugins and apply the defaults.

The defaulting rules are the reference's (reference/gie-protocol.md §2.2):

* a plugin's name defaults to its type; two plugins with one name are an error;
* no ``schedulingProfiles``: one profile ``default`` with every Filter, Scorer and Picker;
* one profile and no ProfileHandler: ``single-profile-handler`` is added; more than one
  handler is an error, and so are several profiles without one;
* a profile without a picker gets ``max-score-picker`` (the first picker instance, else a new
  one); a scorer without a weight gets 1.0;
* ``parser`` defaults to ``openai-parser``, ``saturationDetector`` to ``utilization-detector``;
  a ``pluginRef`` names an instance from ``plugins``, or else a type built with its defaults;
* no ``dataLayer``: ``metrics-data-source`` with ``core-metrics-extractor``; ``sources: []``
  turns metric collection off;
* a plugin that consumes data no configured producer makes gets that data's default producer
  (``prefix-cache-scorer`` -> ``approx-prefix-cache-producer``); producers run in dependency
  order; a cycle is an error.

Every error names the plugin, profile or section and what is wrong. With no file at all the
default configuration of the reference applies (:data:`DEFAULT_CONFIG`).
"""

from __future__ import annotations

import graphlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from igw.config.epp_config import API_VERSIONS, KIND, EndpointPickerConfigSpec, decode
from igw.config.pool import ConfigError
from igw.framework import registry
from igw.framework.plugin import Handle, Plugin
from igw.framework.requestcontrol import (
    Admitter,
    DataProducer,
    Parser,
    PreRequest,
    ResponseCompleteHook,
    ResponseHeadersHook,
    SaturationDetector,
)
from igw.framework.scheduling import Filter, Picker, ProfileHandler, SchedulerProfile, Scorer, WeightedScorer

log = logging.getLogger("igw.config")

DEFAULT_CONFIG = f"""\
apiVersion: {API_VERSIONS[0]}
kind: {KIND}
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""
"""The reference EPP's default (v1.4+): queue 2, KV-cache 2, prefix 3, max-score picker."""

FEATURE_GATES = {
    "flowControl": "the queueing flow-control layer",
    "enableLegacyMetrics": "the reference's old metrics client (igw has one client; accepted, no effect)",
    "dataLayer": "the pluggable data layer (always on; accepted, no effect)",
}
UNSUPPORTED_GATES = {"flowControl": "igw does not have the queueing flow-control layer yet"}

DEFAULT_PARSER = "openai-parser"
DEFAULT_DETECTOR = "utilization-detector"
DEFAULT_PICKER = "max-score-picker"
DEFAULT_HANDLER = "single-profile-handler"
DEFAULT_SOURCE = "metrics-data-source"
DEFAULT_EXTRACTOR = "core-metrics-extractor"

T = TypeVar("T", bound=Plugin)


@dataclass(frozen=True, slots=True)
class DataSourceConfig:
    source: Plugin
    extractors: tuple[Plugin, ...]


@dataclass(slots=True)
class EppConfig:
    """Everything the configuration file decides, built and wired."""

    plugins: dict[str, Plugin]
    """Every instance by name, including the ones the defaults added."""
    profiles: list[SchedulerProfile]
    profile_handler: ProfileHandler
    parser: Parser
    saturation_detector: SaturationDetector
    producers: list[DataProducer]
    """In dependency order."""
    data_sources: list[DataSourceConfig]
    """Empty: no metric collection."""
    feature_gates: frozenset[str] = frozenset()
    added: list[str] = field(default_factory=list)
    """What the defaulting rules added, for the start-up log."""

    def of_role(self, role: type[T]) -> list[T]:
        """Every plugin instance that plays ``role``, in configuration order."""
        return [p for p in self.plugins.values() if isinstance(p, role)]

    @property
    def admitters(self) -> list[Admitter]:
        return self.of_role(Admitter)

    @property
    def pre_request(self) -> list[PreRequest]:
        return self.of_role(PreRequest)

    @property
    def response_headers(self) -> list[ResponseHeadersHook]:
        return self.of_role(ResponseHeadersHook)

    @property
    def response_complete(self) -> list[ResponseCompleteHook]:
        return self.of_role(ResponseCompleteHook)

    def describe(self) -> dict[str, Any]:
        """The effective configuration, in the file's own shape (plus what was added)."""
        return {
            "featureGates": sorted(self.feature_gates),
            "plugins": [
                {"name": p.name, "type": p.type_name, **({"parameters": dict(d)} if (d := p.describe()) else {})}
                for p in self.plugins.values()
            ],
            "schedulingProfiles": [
                {
                    "name": prof.name,
                    "plugins": [
                        *({"pluginRef": f.name} for f in prof.filters),
                        *({"pluginRef": w.scorer.name, "weight": w.weight} for w in prof.scorers),
                        {"pluginRef": prof.picker.name},
                    ],
                }
                for prof in self.profiles
            ],
            "profileHandler": self.profile_handler.name,
            "dataProducers": [p.name for p in self.producers],
            "saturationDetector": {"pluginRef": self.saturation_detector.name},
            "dataLayer": {
                "sources": [
                    {"pluginRef": s.source.name, "extractors": [{"pluginRef": e.name} for e in s.extractors]}
                    for s in self.data_sources
                ]
            },
            "parser": {"pluginRef": self.parser.name},
            "addedByDefaults": list(self.added),
        }


def load_text(text: str | None, handle: Handle, *, source: str = "configuration") -> EppConfig:
    """Both phases over YAML text; ``None`` or empty text loads :data:`DEFAULT_CONFIG`."""
    if text is None or not text.strip():
        return build(decode(DEFAULT_CONFIG, source="the default configuration"), handle)
    return build(decode(text, source=source), handle, source=source)


def build(spec: EndpointPickerConfigSpec, handle: Handle, *, source: str = "configuration") -> EppConfig:
    return _Builder(spec, handle, source).build()


class _Builder:
    def __init__(self, spec: EndpointPickerConfigSpec, handle: Handle, source: str) -> None:
        self.spec = spec
        self.handle = handle
        self.source = source
        self.plugins: dict[str, Plugin] = {}
        self.added: list[str] = []
        self._params_used: set[str] = set()
        """Consumers whose ``producer_params`` built their default producer."""

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    # -- phase 2 -------------------------------------------------------------------------------
    def build(self) -> EppConfig:
        gates = self._feature_gates()
        self._instantiate()
        profiles = self._profiles()
        handler = self._profile_handler(profiles)
        parser = self._resolve(self.spec.parser.plugin_ref if self.spec.parser else DEFAULT_PARSER, Parser, "parser")
        detector = self._saturation_detector()
        data_sources = self._data_layer()
        producers = self._producers()
        self._warn_unused(profiles)
        return EppConfig(
            plugins=self.plugins,
            profiles=profiles,
            profile_handler=handler,
            parser=parser,
            saturation_detector=detector,
            producers=producers,
            data_sources=data_sources,
            feature_gates=gates,
            added=self.added,
        )

    def _feature_gates(self) -> frozenset[str]:
        gates = frozenset(self.spec.feature_gates)
        for gate in self.spec.feature_gates:
            if gate not in FEATURE_GATES:
                known = ", ".join(sorted(FEATURE_GATES))
                raise self.error(f"featureGates: unknown gate {gate!r}; known gates: {known}")
            if gate in UNSUPPORTED_GATES:
                raise self.error(f"featureGates: {gate!r} is not supported: {UNSUPPORTED_GATES[gate]}")
        if self.spec.flow_control is not None and "flowControl" not in gates:
            log.warning("%s: the flowControl section is ignored without featureGates: [flowControl]", self.source)
        return gates

    def _instantiate(self) -> None:
        for spec in self.spec.plugins:
            name = spec.name or spec.type
            if name in self.plugins:
                raise self.error(f"plugins: two plugins are named {name!r}; give each a unique name")
            self.plugins[name] = self._create(spec.type, name, spec.parameters)

    def _create(self, type_name: str, name: str, params: Mapping[str, Any] | None = None) -> Plugin:
        try:
            return registry.create(type_name, name, params, _BuildHandle(self.handle, self.plugins))
        except registry.PluginError as exc:
            raise self.error(str(exc)) from None

    def _add(self, type_name: str, why: str) -> Plugin:
        """Instantiate a type with default parameters under its own name (a defaulting rule)."""
        if type_name in self.plugins:
            raise self.error(f"a plugin named {type_name!r} is needed ({why}) but that name is taken by another type")
        plugin = self._create(type_name, type_name)
        self.plugins[type_name] = plugin
        self.added.append(f"{type_name} ({why})")
        return plugin

    def _resolve(self, ref: str, role: type[T], where: str) -> T:
        """A ``pluginRef``: an instance by name, else a registered type built with defaults."""
        plugin = self.plugins.get(ref)
        if plugin is None:
            if ref not in registry.known_types():
                raise self.error(
                    f"{where}: pluginRef {ref!r} names no plugin instance and no plugin type; "
                    f"instances: {', '.join(self.plugins) or '(none)'}; types: {', '.join(registry.known_types())}"
                )
            plugin = self._add(ref, f"referenced by {where}")
        if not isinstance(plugin, role):
            raise self.error(f"{where}: plugin {ref!r} (type {plugin.type_name}) is not a {_role_name(role)}")
        return plugin

    def _profiles(self) -> list[SchedulerProfile]:
        specs = self.spec.scheduling_profiles
        if not specs:
            refs = [
                (p.name, None) for p in self.plugins.values() if isinstance(p, Filter | Scorer | Picker)
            ]  # every instantiated filter, scorer and picker, in file order
            return [self._profile("default", refs)]
        seen: set[str] = set()
        out = []
        for spec in specs:
            if spec.name in seen:
                raise self.error(f"schedulingProfiles: two profiles are named {spec.name!r}")
            seen.add(spec.name)
            out.append(self._profile(spec.name, [(r.plugin_ref, r.weight) for r in spec.plugins]))
        return out

    def _profile(self, name: str, refs: Iterable[tuple[str, float | None]]) -> SchedulerProfile:
        where = f"scheduling profile {name!r}"
        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        pickers: list[Picker] = []
        for ref, weight in refs:
            plugin = self.plugins.get(ref)
            if plugin is None:
                raise self.error(
                    f"{where}: pluginRef {ref!r} is not defined in plugins; defined: {', '.join(self.plugins) or '(none)'}"
                )
            roles = 0
            if isinstance(plugin, Filter):
                filters.append(plugin)
                roles += 1
            if isinstance(plugin, Scorer):
                scorers.append(WeightedScorer(plugin, 1.0 if weight is None else weight))
                roles += 1
            if isinstance(plugin, Picker):
                pickers.append(plugin)
                roles += 1
            if not roles:
                raise self.error(f"{where}: plugin {ref!r} (type {plugin.type_name}) is not a filter, scorer or picker")
            if weight is not None and not isinstance(plugin, Scorer):
                log.warning("%s: %s: weight of %r ignored (not a scorer)", self.source, where, ref)
        if len(pickers) > 1:
            raise self.error(f"{where}: more than one picker ({', '.join(p.name for p in pickers)})")
        if pickers:
            picker = pickers[0]
        else:
            existing = next((p for p in self.plugins.values() if isinstance(p, Picker)), None)
            picker = existing or self._resolve(DEFAULT_PICKER, Picker, f"{where} (no picker given)")
        return SchedulerProfile(name=name, filters=tuple(filters), scorers=tuple(scorers), picker=picker)

    def _profile_handler(self, profiles: Sequence[SchedulerProfile]) -> ProfileHandler:
        handlers = [p for p in self.plugins.values() if isinstance(p, ProfileHandler)]
        if len(handlers) > 1:
            raise self.error(f"more than one profile handler: {', '.join(h.name for h in handlers)}")
        if handlers:
            handler = handlers[0]
        elif len(profiles) == 1:
            handler = self._resolve(DEFAULT_HANDLER, ProfileHandler, "the single scheduling profile")
        else:
            raise self.error(f"{len(profiles)} scheduling profiles need a profile handler plugin")
        try:
            handler.validate_profiles([p.name for p in profiles])
        except ValueError as exc:
            raise self.error(f"profile handler {handler.name!r}: {exc}") from None
        return handler

    def _saturation_detector(self) -> SaturationDetector:
        spec = self.spec.saturation_detector
        legacy = spec.legacy_parameters() if spec else {}
        if spec is not None and spec.plugin_ref and legacy:
            raise self.error("saturationDetector: give either pluginRef or the inline thresholds, not both")
        if legacy:
            if DEFAULT_DETECTOR in self.plugins:
                raise self.error(
                    f"saturationDetector: inline thresholds, but a plugin named {DEFAULT_DETECTOR!r} exists"
                )
            detector = self._create(DEFAULT_DETECTOR, DEFAULT_DETECTOR, legacy)
            self.plugins[DEFAULT_DETECTOR] = detector
            self.added.append(f"{DEFAULT_DETECTOR} (inline saturationDetector thresholds)")
            assert isinstance(detector, SaturationDetector)
            return detector
        ref = spec.plugin_ref if spec is not None and spec.plugin_ref else DEFAULT_DETECTOR
        return self._resolve(ref, SaturationDetector, "saturationDetector")

    def _data_layer(self) -> list[DataSourceConfig]:
        spec = self.spec.data_layer
        if spec is None:
            sources = [(DEFAULT_SOURCE, [DEFAULT_EXTRACTOR])]
        else:
            sources = [(s.plugin_ref, [e.plugin_ref for e in s.extractors]) for s in spec.sources]
        out = []
        for source_ref, extractor_refs in sources:
            source = self._resolve(source_ref, Plugin, "dataLayer.sources")
            extractors = tuple(self._resolve(ref, Plugin, f"dataLayer source {source_ref!r}") for ref in extractor_refs)
            out.append(DataSourceConfig(source, extractors))
        return out

    def _producers(self) -> list[DataProducer]:
        """Add the default producer of every consumed key nobody produces; order them."""
        while True:
            produced = {key for p in self.plugins.values() if isinstance(p, DataProducer) for key in p.produces}
            missing = [
                (key, default, plugin)
                for plugin in list(self.plugins.values())
                for key, default in plugin.consumes.items()
                if key not in produced
            ]
            if not missing:
                break
            key, default, consumer = missing[0]
            where = f"data {key!r} consumed by {consumer.name!r}"
            if default not in self.plugins and consumer.params_for_producer(default):
                self.plugins[default] = self._create(default, default, consumer.params_for_producer(default))
                self._params_used.add(consumer.name)
                self.added.append(f"{default} ({where}, with its parameters)")
            producer = self._resolve(default, DataProducer, where)
            if key not in producer.produces:
                raise self.error(f"plugin {consumer.name!r} consumes {key!r}, which {default!r} does not produce")
        for plugin in self.plugins.values():
            if plugin.producer_params and plugin.name not in self._params_used:
                log.warning(
                    "%s: parameters %s of %r are ignored: a configured producer provides its data",
                    self.source, ", ".join(sorted(plugin.producer_params)), plugin.name,
                )  # fmt: skip
        producers = [p for p in self.plugins.values() if isinstance(p, DataProducer)]
        makers: dict[str, list[str]] = {}
        for p in producers:
            for key in p.produces:
                makers.setdefault(key, []).append(p.name)
        graph = graphlib.TopologicalSorter[str]()
        for p in producers:
            graph.add(p.name, *(m for key in p.consumes for m in makers.get(key, ()) if m != p.name))
        try:
            order = list(graph.static_order())
        except graphlib.CycleError as exc:
            raise self.error(f"data producers depend on each other in a cycle: {' -> '.join(exc.args[1])}") from None
        by_name = {p.name: p for p in producers}
        return [by_name[n] for n in order]

    def _warn_unused(self, profiles: Sequence[SchedulerProfile]) -> None:
        used = {f.name for p in profiles for f in p.filters} | {w.scorer.name for p in profiles for w in p.scorers}
        for plugin in self.plugins.values():
            if (
                isinstance(plugin, Filter | Scorer)
                and plugin.name not in used
                and not isinstance(plugin, SaturationDetector)
            ):
                log.warning("%s: plugin %r is not used by any scheduling profile", self.source, plugin.name)


def _role_name(role: type[Plugin]) -> str:
    names = {
        Parser: "parser",
        SaturationDetector: "saturation detector",
        ProfileHandler: "profile handler",
        Picker: "picker",
        DataProducer: "data producer",
    }
    return names.get(role, role.__name__)


class _BuildHandle:
    """The handle plugins see while being built: the EPP's, plus the instances built so far."""

    def __init__(self, handle: Handle, plugins: Mapping[str, Plugin]) -> None:
        self._handle = handle
        self._plugins = plugins
        self.clock = handle.clock
        self.endpoints = handle.endpoints
        self.on_endpoints_change = handle.on_endpoints_change

    def plugin(self, name: str) -> Plugin | None:
        return self._plugins.get(name)
