"""/metrics families, parsed with prometheus_client's own parser: vLLM 0.32 names and labels, or SGLang's."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from igw_sim.config import EngineConfig
from igw_sim.engine import Engine
from igw_sim.metrics import build_registry
from igw_sim.profiles import LatencyProfile

FLAT = LatencyProfile(name="flat", weights_ms=10.0, ms_per_token=0.0)


def _scrape(engine: Engine, style: str = "vllm", registry: CollectorRegistry | None = None) -> dict[str, Any]:
    if registry is None:
        registry = build_registry(engine, model_name="m", style=style)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], name: str, sample: str | None = None) -> float:
    (found,) = [s for s in families[name].samples if s.name == (sample or name)]
    return float(found.value)


def _drive(engine: Engine, now: float = 0.0) -> float:
    core = engine.core
    while (plan := core.schedule(now)) is not None:
        core.complete(plan)
        now = plan.end
    return now


def test_vllm_gauges_counters_and_cache_config() -> None:
    engine = Engine(EngineConfig(latency=FLAT, kv_blocks=100, block_size=16, max_num_seqs=1, max_model_len=800))
    core = engine.core
    prompt = list(range(40))
    core.add_request(prompt_ids=prompt, max_tokens=1, now=0.0)
    end = _drive(engine)
    core.add_request(prompt_ids=prompt, max_tokens=3, now=end)
    core.add_request(prompt_ids=list(range(500, 510)), max_tokens=1, now=end)
    core.schedule(end)  # one running (3 blocks), one waiting
    families = _scrape(engine)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge"
        assert families[name].samples[0].labels == {"model_name": "m", "engine": "0"}
    assert _value(families, "vllm:num_requests_running") == 1
    assert _value(families, "vllm:num_requests_waiting") == 1
    assert _value(families, "vllm:kv_cache_usage_perc") == pytest.approx(3 / 99)  # one is the null block
    assert families["vllm:prefix_cache_queries"].type == "counter"
    assert _value(families, "vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 80
    assert _value(families, "vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 32
    assert _value(families, "vllm:num_preemptions", "vllm:num_preemptions_total") == 0
    (info,) = families["vllm:cache_config_info"].samples
    assert info.value == 1.0
    assert info.labels == {
        "block_size": "16",
        "cache_dtype": "auto",
        "enable_prefix_caching": "True",
        "engine": "0",
        "gpu_memory_utilization": "0.9",
        "kv_cache_max_concurrency": "2.0",
        "kv_cache_size_tokens": "1600",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": "100",
        "num_gpu_blocks_override": "100",
        "prefix_caching_hash_algo": "sha256",
    }
    assert "vllm:lora_requests_info" not in families  # only with LoRA enabled
    ttft = families["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert _value(families, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    assert _value(families, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum") == (
        pytest.approx(0.010)
    )
    assert "vllm:inter_token_latency_seconds" in families


def test_lora_requests_info_keeps_one_series_per_label_set_valued_by_time() -> None:
    cfg = EngineConfig(latency=FLAT, max_loras=2, lora_modules=(("a", "/a"), ("b", "/b"), ("c", "/c")))
    engine = Engine(cfg)
    core = engine.core
    registry = build_registry(engine, model_name="m")
    first = _scrape(engine, registry=registry)
    (idle,) = first["vllm:lora_requests_info"].samples
    assert idle.labels == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    for name in ("b", "a", "c"):
        core.add_request(prompt_ids=[1, 2], max_tokens=5, now=0.0, lora_name=name)
    core.add_request(prompt_ids=[3], max_tokens=5, now=0.0)
    plan = core.schedule(0.0)
    assert plan is not None
    samples = _scrape(engine, registry=registry)["vllm:lora_requests_info"].samples
    assert len(samples) == 2
    newest = max(samples, key=lambda s: s.value)
    assert newest.labels == {"max_lora": "2", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
    assert newest.value >= idle.value


def test_sglang_names() -> None:
    engine = Engine(EngineConfig(latency=FLAT, kv_blocks=50, block_size=32))
    engine.core.add_request(prompt_ids=list(range(40)), max_tokens=2, now=0.0)
    engine.core.schedule(0.0)
    families = _scrape(engine, "sglang")
    assert _value(families, "sglang:num_running_reqs") == 1
    assert _value(families, "sglang:num_queue_reqs") == 0
    assert _value(families, "sglang:token_usage") == pytest.approx(2 / 49)  # one is the null block
    assert _value(families, "sglang:num_used_tokens") == 64
    (info,) = families["sglang:cache_config_info"].samples
    assert info.labels == {"page_size": "32", "num_pages": "50"}
    assert families["sglang:num_running_reqs"].samples[0].labels == {"model_name": "m"}
    assert not [name for name in families if name.startswith("vllm:")]
