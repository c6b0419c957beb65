"""The EndpointPickerConfig loader: both phases, every defaulting rule and every error."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

import igw.app.plugins  # noqa: F401  (registers every plugin type)
from igw.api.types import EndpointState, InferenceRequest
from igw.config.loader import DEFAULT_CONFIG, EppConfig, load_text
from igw.config.pool import ConfigError
from igw.flowcontrol.saturation import ConcurrencyDetector, UtilizationDetector
from igw.framework import registry
from igw.framework.registry import StaticHandle
from igw.framework.requestcontrol import DataProducer
from igw.parsing.openai import OpenAIParser
from igw.parsing.passthrough import PassthroughParser
from igw.scheduling.plugins.max_score_picker import MaxScorePicker
from igw.scheduling.plugins.profile_handler import SingleProfileHandler
from igw.scheduling.plugins.random_picker import RandomPicker

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "config").glob("*.yaml"))
TOKENIZER_DIR = Path(__file__).parent / "data" / "tokenizer-parity" / "model"
HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def load(text: str | None) -> EppConfig:
    return load_text(text, StaticHandle(), source="test.yaml")


def fails(text: str, *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert message.startswith("test.yaml: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


def profile_summary(config: EppConfig) -> dict[str, Any]:
    return {
        p.name: {
            "filters": [f.name for f in p.filters],
            "scorers": [(w.scorer.name, w.weight) for w in p.scorers],
            "picker": p.picker.name,
        }
        for p in config.profiles
    }


# --------------------------------------------------------------------------------------------
# the default configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "   \n"], ids=["none", "empty", "blank"])
def test_no_file_gives_the_reference_default(text: str | None) -> None:
    config = load(text)
    assert profile_summary(config) == {
        "default": {
            "filters": [],
            "scorers": [("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0)],
            "picker": "max-score-picker",
        }
    }
    assert isinstance(config.profile_handler, SingleProfileHandler)
    assert isinstance(config.parser, OpenAIParser)
    assert isinstance(config.saturation_detector, UtilizationDetector)
    assert [p.type_name for p in config.producers] == ["approx-prefix-cache-producer"]
    assert [(s.source.type_name, [e.type_name for e in s.extractors]) for s in config.data_sources] == [
        ("metrics-data-source", ["core-metrics-extractor"])
    ]
    assert config.feature_gates == frozenset()
    added = " ".join(config.added)
    for implicit in ("single-profile-handler", "max-score-picker", "approx-prefix-cache-producer",
                     "openai-parser", "utilization-detector", "metrics-data-source", "core-metrics-extractor"):  # fmt: skip
        assert implicit in added


def test_default_config_text_is_the_default_file() -> None:
    assert profile_summary(load(DEFAULT_CONFIG)) == profile_summary(load(None))


def test_describe_round_trips_through_yaml() -> None:
    described = load(None).describe()
    assert yaml.safe_load(yaml.safe_dump(described)) == described
    assert described["schedulingProfiles"][0]["plugins"][-1] == {"pluginRef": "max-score-picker"}
    assert {"name": "queue-scorer", "type": "queue-scorer"} in described["plugins"]


# --------------------------------------------------------------------------------------------
# defaulting rules
# --------------------------------------------------------------------------------------------


def test_plugin_name_defaults_to_type_and_names_are_unique() -> None:
    config = load(HEAD + "plugins:\n- type: queue-scorer\n- type: queue-scorer\n  name: q2\n")
    assert {"queue-scorer", "q2"} <= set(config.plugins)
    fails(HEAD + "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n  name: queue-scorer\n",
          "two plugins are named 'queue-scorer'")  # fmt: skip


def test_no_profiles_means_one_default_profile_with_every_filter_scorer_and_picker() -> None:
    config = load(
        HEAD + "plugins:\n- type: label-selector-filter\n- type: queue-scorer\n- type: lora-affinity-scorer\n"
        "- type: random-picker\n- type: inflight-load-producer\n"
    )
    assert profile_summary(config) == {
        "default": {
            "filters": ["label-selector-filter"],
            "scorers": [("queue-scorer", 1.0), ("lora-affinity-scorer", 1.0)],
            "picker": "random-picker",
        }
    }


def test_a_profile_without_a_picker_reuses_the_first_picker_instance() -> None:
    config = load(
        HEAD + "plugins:\n- type: queue-scorer\n- type: random-picker\n  name: rp\n"
        "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n"
    )
    assert isinstance(config.profiles[0].picker, RandomPicker)
    assert config.profiles[0].picker.name == "rp"


def test_a_profile_without_any_picker_gets_max_score_picker() -> None:
    config = load(
        HEAD
        + "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n"
    )
    assert isinstance(config.profiles[0].picker, MaxScorePicker)
    assert config.profiles[0].name == "p"


def test_scorer_weights_default_to_one() -> None:
    config = load(
        HEAD + "plugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n"
        "  - {pluginRef: kv-cache-utilization-scorer, weight: 0.5}\n"
    )
    assert profile_summary(config)["p"]["scorers"] == [("queue-scorer", 1.0), ("kv-cache-utilization-scorer", 0.5)]


def test_consumers_get_their_default_producer_and_producers_are_ordered() -> None:
    config = load(HEAD + "plugins:\n- type: token-load-scorer\n- type: prefix-cache-scorer\n")
    assert {p.type_name for p in config.producers} == {"inflight-load-producer", "approx-prefix-cache-producer"}
    assert len(config.producers) == 2


def test_a_configured_producer_replaces_the_default_one() -> None:
    config = load(
        HEAD + "plugins:\n- type: approx-prefix-cache-producer\n  name: mine\n  parameters: {blockSizeTokens: 64}\n"
        "- type: prefix-cache-scorer\n"
    )
    assert [p.name for p in config.producers] == ["mine"]
    assert "approx-prefix-cache-producer" not in config.plugins


class _ProducerA(DataProducer):
    type_name = "test-producer-a"
    produces: ClassVar[frozenset[str]] = frozenset({"A"})
    consumes: ClassVar[dict[str, str]] = {"B": "test-producer-b"}

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        request.data["A"] = request.data.get("B", 0) + 1


class _ProducerB(DataProducer):
    type_name = "test-producer-b"
    produces: ClassVar[frozenset[str]] = frozenset({"B"})
    consumes: ClassVar[dict[str, str]] = {"C": "test-producer-c"}

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        request.data["B"] = request.data.get("C", 0) + 1


class _ProducerC(DataProducer):
    type_name = "test-producer-c"
    produces: ClassVar[frozenset[str]] = frozenset({"C"})
    consumes: ClassVar[dict[str, str]] = {}

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        request.data["C"] = 1


class _ProducerLoop(DataProducer):
    type_name = "test-producer-loop"
    produces: ClassVar[frozenset[str]] = frozenset({"C"})
    consumes: ClassVar[dict[str, str]] = {"A": "test-producer-a"}

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        pass


for _cls in (_ProducerA, _ProducerB, _ProducerC, _ProducerLoop):
    registry.register(_cls)


def test_producers_are_added_transitively_and_run_in_dependency_order() -> None:
    config = load(HEAD + "plugins:\n- type: test-producer-a\n- type: queue-scorer\n")
    assert [p.type_name for p in config.producers] == ["test-producer-c", "test-producer-b", "test-producer-a"]
    request = InferenceRequest(request_id="r", model="m", path="/v1/completions", body_size=1)
    for producer in config.producers:
        producer.prepare(request, [])
    assert request.data == {"C": 1, "B": 2, "A": 3}


def test_a_producer_cycle_is_an_error() -> None:
    fails(HEAD + "plugins:\n- type: test-producer-a\n- type: test-producer-loop\n- type: queue-scorer\n", "cycle")


# --------------------------------------------------------------------------------------------
# profile handlers
# --------------------------------------------------------------------------------------------

TWO_PROFILES = (
    "plugins:\n- type: queue-scorer\nschedulingProfiles:\n"
    "- name: a\n  plugins: [{pluginRef: queue-scorer}]\n- name: b\n  plugins: [{pluginRef: queue-scorer}]\n"
)


def test_several_profiles_need_a_profile_handler() -> None:
    fails(HEAD + TWO_PROFILES, "2 scheduling profiles need a profile handler")


def test_single_profile_handler_refuses_two_profiles() -> None:
    fails(HEAD + TWO_PROFILES.replace("- type: queue-scorer\n", "- type: queue-scorer\n- type: single-profile-handler\n", 1),
          "profile handler 'single-profile-handler'")  # fmt: skip


def test_two_profile_handlers_are_an_error() -> None:
    fails(HEAD + "plugins:\n- type: single-profile-handler\n- type: single-profile-handler\n  name: h2\n",
          "more than one profile handler")  # fmt: skip


def test_profile_names_are_unique() -> None:
    fails(HEAD + TWO_PROFILES.replace("name: b", "name: a"), "two profiles are named 'a'")


# --------------------------------------------------------------------------------------------
# references and roles
# --------------------------------------------------------------------------------------------


def test_unknown_plugin_ref_in_a_profile_names_profile_and_ref() -> None:
    fails(HEAD + "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: p\n  plugins: [{pluginRef: nope}]\n",
          "scheduling profile 'p'", "'nope'", "queue-scorer")  # fmt: skip


def test_a_non_scheduling_plugin_in_a_profile_is_an_error() -> None:
    fails(HEAD + "plugins:\n- type: openai-parser\nschedulingProfiles:\n- name: p\n  plugins: [{pluginRef: openai-parser}]\n",
          "not a filter, scorer or picker")  # fmt: skip


def test_two_pickers_in_a_profile_are_an_error() -> None:
    fails(HEAD + "plugins:\n- type: random-picker\n- type: max-score-picker\nschedulingProfiles:\n"
          "- name: p\n  plugins: [{pluginRef: random-picker}, {pluginRef: max-score-picker}]\n",
          "more than one picker")  # fmt: skip


def test_unknown_plugin_type_lists_the_known_types() -> None:
    message = fails(HEAD + "plugins:\n- type: magic-scorer\n", "unknown plugin type 'magic-scorer'")
    for known in ("queue-scorer", "prefix-cache-scorer", "lora-affinity-scorer", "weighted-random-picker"):
        assert known in message


def test_bad_parameters_name_the_plugin_and_the_field() -> None:
    fails(HEAD + "plugins:\n- type: token-load-scorer\n  name: tl\n  parameters: {queueThresholdTokens: -1}\n",
          "plugin 'tl' (type token-load-scorer)", "queueThresholdTokens")  # fmt: skip
    fails(HEAD + "plugins:\n- type: queue-scorer\n  parameters: {unexpected: 1}\n", "unexpected")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("plugins:\n- type: queue-scorer\n  weight: 2\n", "plugins.0.weight: unknown field"),
        ("plugin:\n- type: queue-scorer\n", "plugin: unknown field"),
        ("plugins:\n- name: x\n", "plugins.0.type"),
        ("plugins: {type: queue-scorer}\n", "plugins"),
        ("schedulingProfiles:\n- plugins: []\n", "schedulingProfiles.0.name"),
        ("schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: queue-scorer, weight: -1}]\n", "weight"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("plugins: [\n", "not valid YAML"),
    ],
    ids=[
        "extra-plugin-field",
        "typo-top-level",
        "missing-type",
        "plugins-not-list",
        "profile-without-name",
        "negative-weight",
        "not-a-mapping",
        "bad-yaml",
    ],
)
def test_structure_errors_name_the_field(text: str, fragment: str) -> None:
    fails(HEAD + text if not text.startswith("-") else text, fragment)


@pytest.mark.parametrize(
    "api_version",
    [
        "inference.networking.x-k8s.io/v1alpha1",
        "config.x-k8s.io/v1alpha1",
        "config.apix.gateway-api-inference-extension.sigs.k8s.io/v1alpha1",
    ],
)
def test_documented_api_versions_load(api_version: str) -> None:
    load(f"apiVersion: {api_version}\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n")


def test_wrong_api_version_or_kind_is_an_error() -> None:
    fails("apiVersion: v1\nkind: EndpointPickerConfig\n", "unsupported apiVersion 'v1'")
    fails("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: Pod\n", "kind must be EndpointPickerConfig")


# --------------------------------------------------------------------------------------------
# feature gates, saturation detector, data layer, parser
# --------------------------------------------------------------------------------------------


def test_feature_gates() -> None:
    assert load(
        HEAD + "featureGates: [dataLayer, enableLegacyMetrics]\nplugins:\n- type: queue-scorer\n"
    ).feature_gates == {
        "dataLayer",
        "enableLegacyMetrics",
    }
    fails(HEAD + "featureGates: [warpDrive]\n", "unknown gate 'warpDrive'", "flowControl")
    fails(HEAD + "featureGates: [flowControl]\n", "'flowControl' is not supported")


def test_saturation_detector_by_type_reference() -> None:
    config = load(HEAD + "plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: concurrency-detector}\n")
    assert isinstance(config.saturation_detector, ConcurrencyDetector)
    assert config.saturation_detector in config.pre_request  # its token accounting is hooked up


def test_saturation_detector_by_instance_reference_shares_the_filter_instance() -> None:
    config = load(
        HEAD + "plugins:\n- type: utilization-detector\n  name: util\n  parameters: {queueDepthThreshold: 9, "
        "metricsStalenessThreshold: 1s}\n- type: queue-scorer\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: util}, {pluginRef: queue-scorer}]\n"
        "saturationDetector: {pluginRef: util}\n"
    )
    detector = config.saturation_detector
    assert isinstance(detector, UtilizationDetector)
    assert config.profiles[0].filters == (detector,)
    assert (detector.queue_threshold, detector.staleness) == (9, 1.0)


def test_saturation_detector_inline_legacy_thresholds() -> None:
    config = load(
        HEAD + "plugins:\n- type: queue-scorer\nsaturationDetector:\n  queueDepthThreshold: 7\n"
        "  kvCacheUtilThreshold: 0.5\n  metricsStalenessThreshold: 150ms\n"
    )
    detector = config.saturation_detector
    assert isinstance(detector, UtilizationDetector)
    assert (detector.queue_threshold, detector.kv_threshold, detector.staleness) == (7, 0.5, pytest.approx(0.15))


def test_saturation_detector_errors() -> None:
    fails(HEAD + "saturationDetector: {pluginRef: utilization-detector, queueDepthThreshold: 3}\n", "not both")
    fails(HEAD + "plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\n",
          "is not a saturation detector")  # fmt: skip
    fails(HEAD + "saturationDetector: {kvCacheUtilThreshold: 1.5}\n", "kvCacheUtilThreshold")


def test_data_layer_empty_sources_turn_collection_off() -> None:
    assert load(HEAD + "plugins:\n- type: queue-scorer\ndataLayer: {sources: []}\n").data_sources == []


def test_data_layer_legacy_key_and_explicit_parameters() -> None:
    config = load(
        HEAD + "plugins:\n- type: queue-scorer\n- type: metrics-data-source\n  name: src\n"
        "  parameters: {path: /custom}\n"
        "data:\n  sources:\n  - pluginRef: src\n    extractors: [{pluginRef: core-metrics-extractor}]\n"
    )
    assert [(s.source.name, [e.name for e in s.extractors]) for s in config.data_sources] == [
        ("src", ["core-metrics-extractor"])
    ]


def test_parser_reference() -> None:
    assert isinstance(load(HEAD + "parser: {pluginRef: passthrough-parser}\n").parser, PassthroughParser)
    fails(HEAD + "parser: {pluginRef: vllmgrpc-parser}\n", "'vllmgrpc-parser' names no plugin")
    fails(HEAD + "plugins:\n- type: queue-scorer\nparser: {pluginRef: queue-scorer}\n", "is not a parser")


def test_flow_control_section_without_the_gate_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    load(HEAD + "plugins:\n- type: queue-scorer\nflowControl: {maxRequests: 10}\n")
    assert "flowControl section is ignored" in caplog.text


# --------------------------------------------------------------------------------------------
# examples shipped in the repository
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configurations_load(path: Path) -> None:
    # the examples' tokenizer directories (/models/...) stand for a real model's: a test one here
    text = re.sub(r"/models/[\w.-]+", str(TOKENIZER_DIR), path.read_text())
    config = load_text(text, StaticHandle(), source=str(path))
    assert config.profiles
    assert all(p.picker is not None for p in config.profiles)


def test_a_broken_tokenizer_directory_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    text = HEAD + f"plugins:\n- type: token-producer\n  parameters: {{tokenizer: '{tmp_path}'}}\n"
    with pytest.raises(ConfigError, match=r"token-producer.*tokenizer\.json: not valid JSON"):
        load(text)


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 5


def test_prefix_parameters_on_the_scorer_reach_the_default_producer() -> None:
    config = load(
        HEAD
        + "plugins:\n- type: prefix-cache-scorer\n  parameters: {blockSizeTokens: 32, maxPrefixBlocksToMatch: 64}\n"
    )
    (producer,) = config.producers
    assert producer.describe()["blockSizeTokens"] == 32
    assert producer.describe()["maxPrefixBlocksToMatch"] == 64


def test_prefix_parameters_on_the_scorer_are_reported_when_a_producer_is_configured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    load(
        HEAD + "plugins:\n- type: approx-prefix-cache-producer\n"
        "- type: prefix-cache-scorer\n  parameters: {lruCapacityPerServer: 1000}\n"
    )
    assert "lruCapacityPerServer of 'prefix-cache-scorer' are ignored" in caplog.text


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("{maxPrefixTokensToMatch: 1024}", {"maxPrefixBlocksToMatch": 64}),
        ("{hashBlockSize: 128}", {"blockSizeTokens": 32}),
        ("{blockSizeTokens: 8, maxPrefixTokensToMatch: 80, maxPrefixBlocksToMatch: 3}", {"maxPrefixBlocksToMatch": 10}),
    ],
    ids=["tokens-to-match", "v1.0-hash-block-size", "tokens-win"],
)
def test_other_reference_prefix_parameters(params: str, expected: dict[str, int]) -> None:
    config = load(HEAD + f"plugins:\n- type: prefix-cache-scorer\n  parameters: {params}\n")
    (producer,) = config.producers
    for key, value in expected.items():
        assert producer.describe()[key] == value
