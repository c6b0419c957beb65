"""Metric spec strings, built-in engine configs, and the two data-layer plugins' parameters."""

from __future__ import annotations

import logging
import ssl

import pytest

from igw.api.types import Endpoint, Engine
from igw.datalayer.engines import BUILTIN_ENGINES, EngineConfig, Field, MetricSpec, Source, parse_spec
from igw.datalayer.extractors import DEFAULT_ENGINE_LABEL_KEY, CoreMetricsExtractor
from igw.datalayer.sources import MetricsDataSource
from igw.framework import registry
from igw.framework.registry import PluginError

# --------------------------------------------------------------------------------------------
# Spec strings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vllm:num_requests_waiting", MetricSpec("vllm:num_requests_waiting")),
        ("  padded_name  ", MetricSpec("padded_name")),
        ("m{}", MetricSpec("m")),
        ("m { }", MetricSpec("m")),
        ("m{a=b}", MetricSpec("m", (("a", "b"),))),
        ("m{request_type=waiting}", MetricSpec("m", (("request_type", "waiting"),))),
        ('m{a="b",c="d"}', MetricSpec("m", (("a", "b"), ("c", "d")))),
        ("m{ a = 'b' , c = `d` , }", MetricSpec("m", (("a", "b"), ("c", "d")))),
        ('m{a="x,y}z"}', MetricSpec("m", (("a", "x,y}z"),))),
        ('m{a="q\\"uote\\\\d\\n"}', MetricSpec("m", (("a", 'q"uote\\d\n'),))),
        ("m{a=`raw\\n`}", MetricSpec("m", (("a", "raw\\n"),))),
        ('m{a=""}', MetricSpec("m", (("a", ""),))),
        ("m{a=1.5,b=-x_y}", MetricSpec("m", (("a", "1.5"), ("b", "-x_y")))),
        ("_under:score:9", MetricSpec("_under:score:9")),
    ],
    ids=[
        "bare-name",
        "surrounding-spaces",
        "empty-braces",
        "empty-braces-spaced",
        "unquoted",
        "unquoted-triton",
        "double-quoted",
        "single-backtick-spaces-trailing-comma",
        "quoted-comma-and-brace",
        "escapes",
        "backtick-is-raw",
        "empty-quoted-value",
        "unquoted-punctuation",
        "colons-and-underscores",
    ],
)
def test_parse_valid_specs(text: str, expected: MetricSpec) -> None:
    assert parse_spec(text) == expected
    assert parse_spec(str(expected)) == expected  # str() writes a spec that parses back


@pytest.mark.parametrize("text", ["", "   "], ids=["empty", "blank"])
def test_empty_spec_disables(text: str) -> None:
    assert parse_spec(text) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{a="b"}', "metric name at the start"),
        ("1metric", "metric name at the start"),
        ("m x", "after the metric name"),
        ("m-x", "after the metric name"),
        ("m{a}", "expected '=' after label 'a'"),
        ("m{a=}", "missing value for label 'a'"),
        ("m{a= ,b=c}", "missing value for label 'a'"),
        ('m{a!="b"}', "only '=' matchers"),
        ('m{a=~"b.*"}', "only '=' matchers"),
        ('m{a!~"b"}', "only '=' matchers"),
        ('m{a="b"', "missing '}'"),
        ("m{a=b", "missing '}'"),
        ('m{a="b} ', "unterminated value of 'a'"),
        ("m{a=`b}", "unterminated value of 'a'"),
        ('m{a="b"} extra', "after '}'"),
        ('m{a="b"}}', "after '}'"),
        ('m{a="b" c="d"}', "expected ',' or '}'"),
        ('m{a="b",a="c"}', "label 'a' is given twice"),
        ('m{a="\\q"}', "bad escape"),
        ("m{1a=b}", "expected a label name"),
        ("m{,}", "expected a label name"),
        ('m{"a"="b"}', "expected a label name"),
    ],
    ids=[
        "no-name",
        "name-starts-with-digit",
        "space-in-name",
        "dash-in-name",
        "label-without-value",
        "empty-unquoted-value",
        "empty-unquoted-value-before-comma",
        "not-equal",
        "regex",
        "not-regex",
        "unclosed-after-quoted",
        "unclosed-after-bare",
        "unterminated-double-quote",
        "unterminated-backtick",
        "trailing-garbage",
        "double-closing-brace",
        "missing-comma",
        "duplicate-label",
        "unknown-escape",
        "bad-label-name",
        "lone-comma",
        "quoted-label-name",
    ],
)
def test_parse_invalid_specs(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="metric spec") as info:
        parse_spec(text)
    assert words in str(info.value)
    assert repr(text) in str(info.value)


# --------------------------------------------------------------------------------------------
# EngineConfig from spec strings; the built-ins
# --------------------------------------------------------------------------------------------


def test_engine_config_from_specs_compiles_sources() -> None:
    config = EngineConfig.from_specs(
        "x",
        queued_requests_spec="w{t=waiting}",
        running_requests_spec='r{t="a\\"b"}',
        kv_usage_spec="kv",
        lora_spec="lora",
        cache_info_spec="info",
        cache_num_blocks_label_name="pages",
        cache_block_size_spec="bs",
    )
    assert config.sources() == (
        Source(Field.WAITING, "w", (("t", "waiting"),)),
        Source(Field.RUNNING, "r", (("t", 'a\\"b'),)),  # matched against the escaped exposition text
        Source(Field.KV_USAGE, "kv"),
        Source(Field.BLOCK_SIZE, "bs"),
        Source(Field.NUM_GPU_BLOCKS, "info", label="pages"),
        Source(Field.LORA, "lora"),
    )
    assert config.metrics_path == "/metrics"
    assert config.specs() == {
        "name": "x",
        "queuedRequestsSpec": 'w{t="waiting"}',
        "runningRequestsSpec": 'r{t="a\\"b"}',
        "kvUsageSpec": "kv",
        "loraSpec": "lora",
        "cacheInfoSpec": "info",
        "cacheNumBlocksLabelName": "pages",
        "cacheBlockSizeSpec": "bs",
        "cacheNumBlocksSpec": "",
    }


def test_cache_info_label_names_default_to_vllm_names() -> None:
    config = EngineConfig.from_specs("x", cache_info_spec="info")
    assert (config.cache_block_size_label, config.cache_num_blocks_label) == ("block_size", "num_gpu_blocks")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": ""}, "name must not be empty"),
        ({"kv_usage_spec": "kv{a!=b}"}, "engine 'e': kvUsageSpec: metric spec"),
        ({"cache_info_spec": "info{"}, "engine 'e': cacheInfoSpec: metric spec"),
        ({"cache_block_size_label_name": "bs"}, "cacheBlockSizeLabelName needs cacheInfoSpec"),
        (
            {"cache_info_spec": "i", "cache_num_blocks_label_name": "n", "cache_num_blocks_spec": "n"},
            "cacheNumBlocksLabelName or the matching value spec, not both",
        ),
        ({"cache_info_spec": "i", "cache_block_size_label_name": "page-size"}, "is not a label name"),
    ],
    ids=["empty-name", "bad-spec", "bad-cache-info", "label-without-info", "label-and-value", "bad-label-name"],
)
def test_engine_config_errors(kwargs: dict[str, str], words: str) -> None:
    kwargs = {"name": "e", **kwargs}
    with pytest.raises(ValueError, match=words):
        EngineConfig.from_specs(**kwargs)


def test_builtin_engines() -> None:
    assert set(BUILTIN_ENGINES) == {e.value for e in Engine}
    assert {name: c.metrics_path for name, c in BUILTIN_ENGINES.items()} == {
        "vllm": "/metrics",
        "sglang": "/metrics",
        "trtllm-serve": "/prometheus/metrics",
        "triton-tensorrt-llm": "/metrics",
    }
    vllm = BUILTIN_ENGINES["vllm"]
    assert [str(s) for s in vllm.kv_usage] == ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
    assert str(vllm.lora) == "vllm:lora_requests_info"
    assert all(c.lora is None for name, c in BUILTIN_ENGINES.items() if name != "vllm")
    assert BUILTIN_ENGINES["sglang"].specs()["cacheBlockSizeLabelName"] == "page_size"
    triton = BUILTIN_ENGINES["triton-tensorrt-llm"].specs()
    assert triton["queuedRequestsSpec"] == 'nv_trt_llm_request_metrics{request_type="waiting"}'
    assert triton["cacheNumBlocksSpec"] == 'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max"}'


# --------------------------------------------------------------------------------------------
# core-metrics-extractor
# --------------------------------------------------------------------------------------------


def extractor(**params: object) -> CoreMetricsExtractor:
    plugin = registry.create("core-metrics-extractor", params=params)
    assert isinstance(plugin, CoreMetricsExtractor)
    return plugin


def ep(engine: str | None = None, **labels: str) -> Endpoint:
    return Endpoint("10.0.0.1:8000", "10.0.0.1", 8000, engine=engine, labels=tuple(labels.items()))


ENGINE_LABEL = {"inference.networking.k8s.io/engine-type": "sglang"}


def test_extractor_defaults() -> None:
    ext = extractor()
    assert ext.name == "core-metrics-extractor"
    assert (ext.engine_label_key, ext.default_engine) == (DEFAULT_ENGINE_LABEL_KEY, "vllm")
    assert dict(ext.engines) == dict(BUILTIN_ENGINES)
    described = ext.describe()
    assert described["engineLabelKey"] == "inference.networking.k8s.io/engine-type"
    assert [c["name"] for c in described["engineConfigs"]] == list(BUILTIN_ENGINES)


@pytest.mark.parametrize(
    ("endpoint", "engine"),
    [
        (ep(), "vllm"),
        (ep("trtllm-serve"), "trtllm-serve"),
        (ep(**ENGINE_LABEL), "sglang"),
        (ep("trtllm-serve", **ENGINE_LABEL), "sglang"),
        (ep("trtllm-serve", **{"inference.networking.k8s.io/engine-type": ""}), "trtllm-serve"),
        (ep("trtllm-serve", other="sglang"), "trtllm-serve"),
    ],
    ids=["default", "declared", "label", "label-beats-declared", "empty-label-ignored", "other-label-ignored"],
)
def test_engine_selection(endpoint: Endpoint, engine: str) -> None:
    assert extractor().engine_for(endpoint).name == engine


def test_engine_selection_with_custom_label_key_and_default() -> None:
    ext = extractor(engineLabelKey="example.com/engine", defaultEngine="triton-tensorrt-llm")
    assert ext.engine_for(ep()).name == "triton-tensorrt-llm"
    assert ext.engine_for(ep(**ENGINE_LABEL)).name == "triton-tensorrt-llm"  # not the configured key
    assert ext.engine_for(ep(**{"example.com/engine": "sglang"})).name == "sglang"


def test_unknown_engine_falls_back_to_default_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    ext = extractor(defaultEngine="sglang")
    with caplog.at_level(logging.WARNING, logger="igw.datalayer"):
        for _ in range(3):
            assert ext.engine_for(ep("lmdeploy")).name == "sglang"
            assert ext.engine_for(ep(**{"inference.networking.k8s.io/engine-type": "tgi"})).name == "sglang"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "'lmdeploy'" in warnings[0]
    assert "'tgi'" in warnings[1]
    assert "reading it as 'sglang'" in warnings[0]


def test_user_config_replaces_a_builtin_entirely() -> None:
    ext = extractor(engineConfigs=[{"name": "vllm", "queuedRequestsSpec": "my_queue{shard=0}"}])
    vllm = ext.engine_for(ep())
    assert vllm.queued == (MetricSpec("my_queue", (("shard", "0"),)),)
    assert (vllm.running, vllm.kv_usage, vllm.lora, vllm.cache_info) == ((), (), None, None)  # no field merge
    assert ext.engines["sglang"] is BUILTIN_ENGINES["sglang"]


def test_user_config_of_trtllm_serve_keeps_its_metrics_path() -> None:
    ext = extractor(engineConfigs=[{"name": "trtllm-serve", "queuedRequestsSpec": "q"}])
    assert ext.engines["trtllm-serve"].metrics_path == "/prometheus/metrics"


def test_user_engine_is_added_and_can_be_the_default() -> None:
    ext = extractor(
        defaultEngine="tgi",
        engineConfigs=[
            {
                "name": "tgi",
                "queuedRequestsSpec": "tgi_queue_size",
                "runningRequestsSpec": "tgi_batch_current_size",
                "cacheInfoSpec": "tgi_info",
                "cacheBlockSizeLabelName": "block",
            }
        ],
    )
    assert ext.engine_for(ep()).name == "tgi"
    assert ext.engine_for(ep()).cache_block_size_label == "block"
    assert set(ext.engines) == {*BUILTIN_ENGINES, "tgi"}
    assert ext.describe()["defaultEngine"] == "tgi"


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"engineConfigs": [{"name": "default"}]}, "'default' is reserved"),
        ({"defaultEngine": "tgi"}, "defaultEngine 'tgi' is not a known engine; known: vllm, sglang, trtllm-serve"),
        ({"defaultEngine": "default"}, "defaultEngine 'default' is not a known engine"),
        ({"engineConfigs": [{"name": "x"}, {"name": "x"}]}, "'x' is given twice"),
        ({"engineConfigs": [{"name": ""}]}, "name must not be empty"),
        ({"engineConfigs": [{"name": "x", "kvUsageSpec": "kv{a=~b}"}]}, "engineConfigs.0.kvUsageSpec"),
        ({"engineConfigs": [{"name": "x", "loraSpec": "{}"}]}, "engineConfigs.0.loraSpec"),
        ({"engineConfigs": [{"name": "x", "cacheBlockSizeLabelName": "b"}]}, "needs cacheInfoSpec"),
        ({"engineConfigs": [{"name": "x", "kvSpec": "kv"}]}, "engineConfigs.0.kvSpec: Extra inputs"),
        ({"engineConfigs": [{"queuedRequestsSpec": "q"}]}, "engineConfigs.0.name: Field required"),
        ({"engineLabelKey": ""}, "engineLabelKey must not be empty"),
        ({"engine_label_keys": "x"}, "engine_label_keys: Extra inputs"),
    ],
    ids=[
        "reserved-name",
        "unknown-default",
        "default-is-not-an-engine",
        "duplicate-user-names",
        "empty-name",
        "bad-spec",
        "spec-without-name",
        "label-without-cache-info",
        "unknown-key-in-engine-config",
        "missing-name",
        "empty-label-key",
        "unknown-key",
    ],
)
def test_extractor_parameter_errors(params: dict[str, object], words: str) -> None:
    with pytest.raises(PluginError, match="core-metrics-extractor") as info:
        extractor(**params)
    assert words in str(info.value)


# --------------------------------------------------------------------------------------------
# metrics-data-source
# --------------------------------------------------------------------------------------------


def source(**params: object) -> MetricsDataSource:
    plugin = registry.create("metrics-data-source", params=params)
    assert isinstance(plugin, MetricsDataSource)
    return plugin


def test_data_source_defaults() -> None:
    src = source()
    assert src.describe() == {"scheme": "http", "path": None, "insecureSkipVerify": True}
    assert src.ssl_context() is None
    getter = src.getter("10.0.0.1", 8000, "/prometheus/metrics", timeout=1.0)
    assert getter.ssl is None
    assert b"GET /prometheus/metrics HTTP/1.1" in getter._request


def test_data_source_path_overrides_the_engine_path() -> None:
    getter = source(path="/custom").getter("10.0.0.1", 8000, "/prometheus/metrics", timeout=1.0)
    assert b"GET /custom HTTP/1.1" in getter._request


def test_https_contexts() -> None:
    insecure = source(scheme="https")
    context = insecure.ssl_context()
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)
    assert insecure.ssl_context() is context  # one context for every endpoint
    assert insecure.getter("h", 1, "/metrics", timeout=1.0).ssl is context

    verified = source(scheme="https", insecureSkipVerify=False).ssl_context()
    assert verified is not None
    assert (verified.verify_mode, verified.check_hostname) == (ssl.CERT_REQUIRED, True)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"scheme": "ftp"}, "scheme: Input should be 'http' or 'https'"),
        ({"path": "metrics"}, "path must start with '/'"),
        ({"insecure": True}, "insecure: Extra inputs"),
    ],
    ids=["bad-scheme", "relative-path", "unknown-key"],
)
def test_data_source_parameter_errors(params: dict[str, object], words: str) -> None:
    with pytest.raises(PluginError, match="metrics-data-source") as info:
        source(**params)
    assert words in str(info.value)
