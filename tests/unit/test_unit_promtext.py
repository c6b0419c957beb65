"""MetricsReader: the cheap Prometheus text reader, per engine, cross-checked with prometheus_client."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from igw.api.types import EndpointMetrics, Engine
from igw.datalayer.engines import ENGINE_METRICS, Field
from igw.datalayer.promtext import MetricsReader, parse_labels

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


def _read(engine: Engine, text: str, now: float = 12.5) -> EndpointMetrics:
    return MetricsReader(ENGINE_METRICS[engine]).read(text, now=now)


# --------------------------------------------------------------------------------------------
# Every engine: the five fields from realistic text
# --------------------------------------------------------------------------------------------

REALISTIC = [
    (Engine.VLLM, VLLM_TEXT, EndpointMetrics(7.0, 4.0, 0.4375, 16, 27362, 12.5)),
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
    assert {engine for engine, _, _ in REALISTIC} == set(ENGINE_METRICS)


# --------------------------------------------------------------------------------------------
# Cross-check with prometheus_client's full parser on the same text
# --------------------------------------------------------------------------------------------


def _reference(engine: Engine, text: str, now: float) -> EndpointMetrics:
    """What the engine's sources select, computed with prometheus_client (first matching series wins)."""
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    found: dict[Field, float] = {}
    for src in ENGINE_METRICS[engine].sources:
        if src.field in found:
            continue
        for sample in samples:
            if sample.name != src.metric or any(sample.labels.get(k) != v for k, v in src.match):
                continue
            if src.label:
                raw = sample.labels.get(src.label)
                try:
                    value = float(raw) if raw is not None else math.nan
                except ValueError:
                    value = math.nan
            else:
                value = sample.value
            if math.isfinite(value):
                found[src.field] = value
                break

    def as_int(v: float | None) -> int | None:
        return int(v) if v is not None and v > 0 else None

    return EndpointMetrics(
        waiting=found.get(Field.WAITING, 0.0),
        running=found.get(Field.RUNNING, 0.0),
        kv_usage=min(max(found.get(Field.KV_USAGE, 0.0), 0.0), 1.0),
        block_size=as_int(found.get(Field.BLOCK_SIZE)),
        num_gpu_blocks=as_int(found.get(Field.NUM_GPU_BLOCKS)),
        scraped_at=now,
    )


CROSS_CHECK = [
    *REALISTIC,
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
