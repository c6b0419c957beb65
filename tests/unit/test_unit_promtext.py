"""MetricsReader: the cheap Prometheus text reader, per engine, cross-checked with prometheus_client."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from igw.api.types import EndpointMetrics, Engine
from igw.datalayer.engines import BUILTIN_ENGINES, EngineConfig, MetricSpec
from igw.datalayer.promtext import MetricsReader, lora_info, parse_labels

# --------------------------------------------------------------------------------------------
# Realistic exposition texts
# --------------------------------------------------------------------------------------------

VLLM_TEXT = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12873.0
python_gc_objects_collected_total{generation="1"} 2304.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.1514752e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# HELP vllm:num_requests_waiting_by_reason Not a real series: a longer name sharing the prefix.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 99.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4375
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 20480.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7215401233e+09
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 118.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7215401233e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 118.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 118.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 4.25
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",calculate_kv_scales="False",cpu_offload_gb="0",\
enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",is_attention_free="False",\
num_cpu_blocks="None",num_gpu_blocks="27362",num_gpu_blocks_override="None",prefix_caching_hash_algo="sha256",\
sliding_window="None",swap_space="4",swap_space_bytes="4294967296"} 1.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7215401e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-a,lora-b",waiting_lora_adapters="lora-b"} 1.7215405e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-a",waiting_lora_adapters="lora-a"} 1.7215403e+09
"""

VLLM_LEGACY_TEXT = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.125
"""

SGLANG_TEXT = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",tp_rank="0"} 3.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",tp_rank="0"} 5120.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",tp_rank="0"} 0.62
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="meta-llama/Llama-3.1-8B-Instruct",tp_rank="0"} 5.0
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 81920.0
# HELP sglang:cache_config_info Cache configuration.
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{num_pages="8192",page_size="1"} 1.0
"""

TRTLLM_TEXT = """\
# HELP trtllm_num_requests_waiting Number of requests waiting.
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{model_name="llama"} 2.0
# HELP trtllm_num_requests_running Number of requests running.
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{model_name="llama"} 6.0
# HELP trtllm_kv_cache_utilization KV cache utilization.
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{model_name="llama"} 0.9
# HELP trtllm_kv_cache_tokens_per_block Tokens per KV block.
# TYPE trtllm_kv_cache_tokens_per_block gauge
trtllm_kv_cache_tokens_per_block{model_name="llama"} 32.0
# HELP trtllm_kv_cache_max_blocks Maximum KV blocks.
# TYPE trtllm_kv_cache_max_blocks gauge
trtllm_kv_cache_max_blocks{model_name="llama"} 4096.0
"""

TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 42
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 11
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 12
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 300
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 700
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 1000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.3
"""


def _read(engine: Engine | EngineConfig, text: str, now: float = 12.5) -> EndpointMetrics:
    config = engine if isinstance(engine, EngineConfig) else BUILTIN_ENGINES[engine]
    return MetricsReader(config).read(text, now=now)


AB = frozenset({"lora-a", "lora-b"})
B = frozenset({"lora-b"})


# --------------------------------------------------------------------------------------------
# Every engine: the five fields from realistic text
# --------------------------------------------------------------------------------------------

REALISTIC = [
    (Engine.VLLM, VLLM_TEXT, EndpointMetrics(7.0, 4.0, 0.4375, 16, 27362, 12.5, 2, AB, B)),
    (Engine.VLLM, VLLM_LEGACY_TEXT, EndpointMetrics(1.0, 2.0, 0.125, None, None, 12.5)),
    (Engine.SGLANG, SGLANG_TEXT, EndpointMetrics(5.0, 3.0, 0.62, 1, 8192, 12.5)),
    (Engine.TRTLLM_SERVE, TRTLLM_TEXT, EndpointMetrics(2.0, 6.0, 0.9, 32, 4096, 12.5)),
    (Engine.TRITON_TENSORRT_LLM, TRITON_TEXT, EndpointMetrics(3.0, 11.0, 0.3, 64, 1000, 12.5)),
]
REALISTIC_IDS = ["vllm", "vllm-legacy-gpu-cache", "sglang", "trtllm-serve", "triton-label-selection"]


@pytest.mark.parametrize(("engine", "text", "expected"), REALISTIC, ids=REALISTIC_IDS)
def test_reads_every_field_from_realistic_text(engine: Engine, text: str, expected: EndpointMetrics) -> None:
    assert _read(engine, text) == expected


def test_every_engine_has_a_realistic_fixture() -> None:
    assert {engine for engine, _, _ in REALISTIC} == set(BUILTIN_ENGINES)


# --------------------------------------------------------------------------------------------
# Cross-check with prometheus_client's full parser on the same text
# --------------------------------------------------------------------------------------------


def _reference(engine: Engine | EngineConfig, text: str, now: float) -> EndpointMetrics:
    """What the engine's specs select, computed with prometheus_client from the config itself:
    the first matching series with a finite value, LoRA info from the series of largest value."""
    config = engine if isinstance(engine, EngineConfig) else BUILTIN_ENGINES[engine]
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def matching(spec: MetricSpec) -> list[Sample]:
        return [s for s in samples if s.name == spec.name and all(s.labels.get(k, "") == v for k, v in spec.labels)]

    def first(specs: tuple[MetricSpec, ...], label: str | None = None) -> float | None:
        for spec in specs:
            for sample in matching(spec):
                if label:
                    try:
                        value = float(sample.labels.get(label, "nan"))
                    except ValueError:
                        value = math.nan
                else:
                    value = sample.value
                if math.isfinite(value):
                    return value
        return None

    def as_int(v: float | None) -> int | None:
        return int(v) if v is not None and v > 0 else None

    def some(spec: MetricSpec | None) -> tuple[MetricSpec, ...]:
        return () if spec is None else (spec,)

    if config.cache_block_size is not None:
        block_size = first((config.cache_block_size,))
    else:
        block_size = first(some(config.cache_info), config.cache_block_size_label)
    if config.cache_num_blocks is not None:
        num_blocks = first((config.cache_num_blocks,))
    else:
        num_blocks = first(some(config.cache_info), config.cache_num_blocks_label)
    max_lora, running, waiting = None, frozenset[str](), frozenset[str]()
    if config.lora is not None:
        lora_series = [s for s in matching(config.lora) if math.isfinite(s.value)]
        if lora_series:
            newest = max(lora_series, key=lambda s: s.value)  # max() keeps the first of equal values
            max_lora, running, waiting = lora_info(newest.labels)

    return EndpointMetrics(
        waiting=first(config.queued) or 0.0,
        running=first(config.running) or 0.0,
        kv_usage=min(max(first(config.kv_usage) or 0.0, 0.0), 1.0),
        block_size=as_int(block_size),
        num_gpu_blocks=as_int(num_blocks),
        scraped_at=now,
        max_lora=max_lora,
        running_adapters=running,
        waiting_adapters=waiting,
    )


def _lora_line(max_lora: str, running: str, waiting: str, ts: str) -> str:
    return (
        f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{running}",'
        f'waiting_lora_adapters="{waiting}"}} {ts}\n'
    )


CUSTOM = EngineConfig.from_specs(
    "custom",
    queued_requests_spec='q{pool="a \\"b\\"",zone=""}',
    running_requests_spec="r{kind=`x\\y`}",
    kv_usage_spec="kv",
    lora_spec="lora_info{engine='1'}",
    cache_info_spec="cfg",
    cache_block_size_label_name="page",
    cache_num_blocks_spec="blocks{type=max}",
)
CUSTOM_TEXT = """\
q{pool="other"} 1
q{pool="a \\"b\\"",zone="eu"} 2
q{pool="a \\"b\\""} 3
r{kind="x"} 4
r{kind="x\\\\y"} 5
kv 0.5
cfg{page="8",num_gpu_blocks="100"} 1
blocks{type="min"} 10
blocks{type="max"} 20
lora_info{engine="0",max_lora="9",running_lora_adapters="zero"} 200
lora_info{engine="1",max_lora="3",running_lora_adapters="one"} 100
"""

CROSS_CHECK = [
    *REALISTIC,
    (CUSTOM, CUSTOM_TEXT, EndpointMetrics(3.0, 5.0, 0.5, 8, 20, 12.5, 3, frozenset({"one"}))),
    (
        Engine.VLLM,
        _lora_line("4", "a", "", "10") + _lora_line("4", "b", "", "30") + _lora_line("4", "c", "", "20"),
        EndpointMetrics(scraped_at=12.5, max_lora=4, running_adapters=frozenset({"b"})),
    ),
    (
        Engine.VLLM,
        _lora_line("4", "a", "", "30") + _lora_line("4", "b", "", "30"),
        EndpointMetrics(scraped_at=12.5, max_lora=4, running_adapters=frozenset({"a"})),
    ),
    (
        Engine.VLLM,
        _lora_line("4", "a", "", "NaN") + _lora_line("4", "b", "", "+Inf") + _lora_line("4", "c", "", "1"),
        EndpointMetrics(scraped_at=12.5, max_lora=4, running_adapters=frozenset({"c"})),
    ),
    (
        Engine.VLLM,
        _lora_line("1", " a , b ,, ", " c,", "5"),
        EndpointMetrics(scraped_at=12.5, max_lora=1, running_adapters=frozenset("ab"), waiting_adapters=frozenset("c")),
    ),
    (Engine.VLLM, "vllm:lora_requests_info 5\n", EndpointMetrics(scraped_at=12.5)),
    (Engine.SGLANG, _lora_line("4", "a", "b", "5"), EndpointMetrics(scraped_at=12.5)),
    (
        Engine.VLLM,
        "vllm:gpu_cache_usage_perc 0.75\nvllm:kv_cache_usage_perc 0.25\n",
        EndpointMetrics(kv_usage=0.25, scraped_at=12.5),
    ),
    (Engine.VLLM, "", EndpointMetrics(scraped_at=12.5)),
    (Engine.TRITON_TENSORRT_LLM, VLLM_TEXT, EndpointMetrics(scraped_at=12.5)),
    (
        Engine.VLLM,
        'vllm:num_requests_waiting{engine="0"} 3 1712345678000\nvllm:num_requests_waiting{engine="1"} 9\n',
        EndpointMetrics(waiting=3.0, scraped_at=12.5),
    ),
    (
        Engine.VLLM,
        'vllm:kv_cache_usage_perc{model_name="a \\"quoted\\" name",engine="0"} 0.5\n',
        EndpointMetrics(kv_usage=0.5, scraped_at=12.5),
    ),
    (
        Engine.SGLANG,
        'sglang:cache_config_info{page_size="16",num_pages="0"} 1\n',
        EndpointMetrics(block_size=16, scraped_at=12.5),
    ),
]
CROSS_CHECK_IDS = [
    *REALISTIC_IDS,
    "custom-specs-quoting-escapes-empty-matcher",
    "lora-largest-value-wins",
    "lora-tie-first-wins",
    "lora-non-finite-ignored",
    "lora-spaces-and-empty-items",
    "lora-no-labels",
    "lora-not-read-by-sglang",
    "legacy-kv-name-only-when-new-absent",
    "empty-text",
    "wrong-engine",
    "first-series-wins-and-timestamp-ignored",
    "escaped-quotes-in-label",
    "zero-num-pages-is-none",
]


@pytest.mark.parametrize(("engine", "text", "expected"), CROSS_CHECK, ids=CROSS_CHECK_IDS)
def test_matches_prometheus_client_parser(engine: Engine, text: str, expected: EndpointMetrics) -> None:
    ours = _read(engine, text)
    assert ours == _reference(engine, text, 12.5)
    assert ours == expected


# --------------------------------------------------------------------------------------------
# Missing metrics, garbage, clamping, non-finite values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "text", "expected"),
    [
        (Engine.VLLM, "", EndpointMetrics(scraped_at=12.5)),
        (Engine.VLLM, "# only comments\n# TYPE x gauge\n", EndpointMetrics(scraped_at=12.5)),
        (Engine.VLLM, 'vllm:num_requests_running{engine="0"} 2\n', EndpointMetrics(running=2.0, scraped_at=12.5)),
        (Engine.SGLANG, "sglang:num_queue_reqs 4\n", EndpointMetrics(waiting=4.0, scraped_at=12.5)),
        (
            Engine.VLLM,
            'vllm:cache_config_info{engine="0",block_size="16"} 1\n',
            EndpointMetrics(block_size=16, scraped_at=12.5),
        ),
        (
            Engine.VLLM,
            'vllm:cache_config_info{engine="0",num_gpu_blocks="None",block_size="None"} 1\n',
            EndpointMetrics(scraped_at=12.5),
        ),
        (
            Engine.TRITON_TENSORRT_LLM,
            'nv_trt_llm_request_metrics{request_type="active"} 5\n',
            EndpointMetrics(scraped_at=12.5),
        ),
    ],
    ids=[
        "empty",
        "comments-only",
        "only-running",
        "unlabelled-series",
        "cache-info-without-num-gpu-blocks",
        "cache-info-None-labels",
        "triton-no-matching-request-type",
    ],
)
def test_missing_metrics_give_defaults(engine: Engine, text: str, expected: EndpointMetrics) -> None:
    assert _read(engine, text) == expected


GARBAGE = [
    "this is not prometheus text",
    "{",
    "}",
    " ",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting ",
    "vllm:num_requests_waiting{engine=",
    'vllm:num_requests_waiting{engine="0"',
    "vllm:num_requests_waiting abc",
    "vllm:num_requests_waiting{} ",
    "vllm:kv_cache_usage_perc twelve",
    'vllm:cache_config_info{block_size="sixteen"} 1',
    "\x00\x01\x02",
    "é∂ƒ 3",
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=[f"garbage-{i}" for i in range(len(GARBAGE))])
def test_garbage_lines_are_ignored(garbage: str) -> None:
    text = f'{garbage}\nvllm:num_requests_waiting{{engine="0"}} 5\n{garbage}\nvllm:num_requests_running 1\n'
    assert _read(Engine.VLLM, text) == EndpointMetrics(waiting=5.0, running=1.0, scraped_at=12.5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0.5", 0.5), ("1.0", 1.0), ("1.7", 1.0), ("42", 1.0), ("-0.2", 0.0), ("0", 0.0), ("1e-3", 0.001)],
    ids=["half", "one", "above-one", "percent-by-mistake", "negative", "zero", "exponent"],
)
def test_kv_usage_is_clamped_to_unit_interval(raw: str, expected: float) -> None:
    assert _read(Engine.VLLM, f'vllm:kv_cache_usage_perc{{engine="0"}} {raw}\n').kv_usage == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vllm:num_requests_waiting NaN\n", EndpointMetrics(scraped_at=12.5)),
        ("vllm:num_requests_waiting +Inf\n", EndpointMetrics(scraped_at=12.5)),
        ("vllm:num_requests_waiting -Inf\n", EndpointMetrics(scraped_at=12.5)),
        ("vllm:kv_cache_usage_perc NaN\n", EndpointMetrics(scraped_at=12.5)),
        # a non-finite first series does not hide a later finite one
        (
            'vllm:num_requests_waiting{engine="0"} NaN\nvllm:num_requests_waiting{engine="1"} 6\n',
            EndpointMetrics(waiting=6.0, scraped_at=12.5),
        ),
        # NaN under the new KV name falls back to the legacy name
        (
            "vllm:kv_cache_usage_perc NaN\nvllm:gpu_cache_usage_perc 0.25\n",
            EndpointMetrics(kv_usage=0.25, scraped_at=12.5),
        ),
        ('vllm:cache_config_info{block_size="NaN"} 1\n', EndpointMetrics(scraped_at=12.5)),
    ],
    ids=[
        "nan-waiting",
        "inf-waiting",
        "minus-inf-waiting",
        "nan-kv",
        "nan-then-finite",
        "nan-kv-then-legacy",
        "nan-label",
    ],
)
def test_non_finite_values_are_ignored(text: str, expected: EndpointMetrics) -> None:
    assert _read(Engine.VLLM, text) == expected


def test_scraped_at_is_the_given_now() -> None:
    assert _read(Engine.VLLM, VLLM_TEXT, now=99.0).scraped_at == 99.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('a="1",b="x"', {"a": "1", "b": "x"}),
        ('a = "1" , b="x y"', {"a": "1", "b": "x y"}),
        ('a="with \\"escaped\\" quotes"', {"a": 'with \\"escaped\\" quotes'}),
        ('a="1",', {"a": "1"}),
        ("", {}),
        ("garbage", {}),
    ],
    ids=["plain", "spaces", "escapes-kept", "trailing-comma", "empty", "garbage"],
)
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected


def test_tab_separated_sample_is_read_like_prometheus_client() -> None:
    text = "vllm:num_requests_waiting\t3\n"
    parsed = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples]
    assert parsed == [3.0]
    assert _read(Engine.VLLM, text).waiting == 3.0


# --------------------------------------------------------------------------------------------
# LoRA info labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"max_lora": "2", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}, (2, {"a", "b"}, {"c"})),
        ({"max_lora": " 3 ", "running_lora_adapters": " a , b ", "waiting_lora_adapters": " "}, (3, {"a", "b"}, set())),
        ({"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}, (0, set(), set())),
        ({"running_lora_adapters": "a"}, (None, {"a"}, set())),
        ({"max_lora": "two"}, (None, set(), set())),
        ({"max_lora": "2.0"}, (None, set(), set())),
        ({"max_lora": "-1"}, (None, set(), set())),
        ({"max_lora": ""}, (None, set(), set())),
        ({"running_lora_adapters": ",,a,,a,"}, (None, {"a"}, set())),
        ({}, (None, set(), set())),
    ],
    ids=[
        "plain",
        "spaces-trimmed",
        "zero-and-empty-lists",
        "missing-max-lora",
        "max-lora-not-a-number",
        "max-lora-not-an-integer",
        "max-lora-negative",
        "max-lora-empty",
        "empty-items-and-duplicates",
        "no-labels",
    ],
)
def test_lora_info_labels(labels: dict[str, str], expected: tuple[int | None, set[str], set[str]]) -> None:
    assert lora_info(labels) == expected


def test_lora_series_order_does_not_matter() -> None:
    lines = [_lora_line("2", name, "", ts) for name, ts in (("old", "1"), ("new", "3"), ("mid", "2"))]
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        text = VLLM_LEGACY_TEXT + "".join(lines[i] for i in order)
        assert _read(Engine.VLLM, text).running_adapters == frozenset({"new"})


def test_lora_does_not_stop_the_other_fields() -> None:
    text = _lora_line("2", "a", "", "5") + VLLM_LEGACY_TEXT + _lora_line("2", "b", "", "6")
    m = _read(Engine.VLLM, text)
    assert (m.waiting, m.running, m.kv_usage, m.running_adapters) == (1.0, 2.0, 0.125, frozenset({"b"}))


def test_disabled_signals_read_nothing() -> None:
    only_queue = EngineConfig.from_specs("q", queued_requests_spec="vllm:num_requests_waiting")
    assert _read(only_queue, VLLM_TEXT) == EndpointMetrics(waiting=7.0, scraped_at=12.5)
    assert _read(EngineConfig.from_specs("nothing"), VLLM_TEXT) == EndpointMetrics(scraped_at=12.5)
