"""Which Prometheus series carry queue depth, running requests and KV use, per model-server kind.

Names follow the Model Server Protocol table (reference/gie-protocol.md §3). A source either
reads the sample value or, for info-style metrics, one of the series' labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from igw.api.types import Engine


class Field(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    KV_USAGE = "kv_usage"
    BLOCK_SIZE = "block_size"
    NUM_GPU_BLOCKS = "num_gpu_blocks"


@dataclass(frozen=True, slots=True)
class Source:
    """``metric{match...}`` gives ``field``: its value, or the value of ``label`` if set."""

    field: Field
    metric: str
    match: tuple[tuple[str, str], ...] = ()
    label: str | None = None


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    engine: Engine
    sources: tuple[Source, ...]
    metrics_path: str = "/metrics"

    def by_name(self) -> dict[str, tuple[Source, ...]]:
        out: dict[str, list[Source]] = {}
        for src in self.sources:
            out.setdefault(src.metric, []).append(src)
        return {name: tuple(srcs) for name, srcs in out.items()}


F = Field
ENGINE_METRICS: dict[Engine, EngineMetrics] = {
    Engine.VLLM: EngineMetrics(
        Engine.VLLM,
        (
            Source(F.WAITING, "vllm:num_requests_waiting"),
            Source(F.RUNNING, "vllm:num_requests_running"),
            Source(F.KV_USAGE, "vllm:kv_cache_usage_perc"),
            Source(F.KV_USAGE, "vllm:gpu_cache_usage_perc"),  # vLLM before 0.10
            Source(F.BLOCK_SIZE, "vllm:cache_config_info", label="block_size"),
            Source(F.NUM_GPU_BLOCKS, "vllm:cache_config_info", label="num_gpu_blocks"),
        ),
    ),
    Engine.SGLANG: EngineMetrics(
        Engine.SGLANG,
        (
            Source(F.WAITING, "sglang:num_queue_reqs"),
            Source(F.RUNNING, "sglang:num_running_reqs"),
            Source(F.KV_USAGE, "sglang:token_usage"),
            Source(F.BLOCK_SIZE, "sglang:cache_config_info", label="page_size"),
            Source(F.NUM_GPU_BLOCKS, "sglang:cache_config_info", label="num_pages"),
        ),
    ),
    Engine.TRTLLM_SERVE: EngineMetrics(
        Engine.TRTLLM_SERVE,
        (
            Source(F.WAITING, "trtllm_num_requests_waiting"),
            Source(F.RUNNING, "trtllm_num_requests_running"),
            Source(F.KV_USAGE, "trtllm_kv_cache_utilization"),
            Source(F.BLOCK_SIZE, "trtllm_kv_cache_tokens_per_block"),
            Source(F.NUM_GPU_BLOCKS, "trtllm_kv_cache_max_blocks"),
        ),
        metrics_path="/prometheus/metrics",
    ),
    Engine.TRITON_TENSORRT_LLM: EngineMetrics(
        Engine.TRITON_TENSORRT_LLM,
        (
            Source(F.WAITING, "nv_trt_llm_request_metrics", (("request_type", "waiting"),)),
            Source(F.RUNNING, "nv_trt_llm_request_metrics", (("request_type", "scheduled"),)),
            Source(F.KV_USAGE, "nv_trt_llm_kv_cache_block_metrics", (("kv_cache_block_type", "fraction"),)),
            Source(F.BLOCK_SIZE, "nv_trt_llm_kv_cache_block_metrics", (("kv_cache_block_type", "tokens_per"),)),
            Source(F.NUM_GPU_BLOCKS, "nv_trt_llm_kv_cache_block_metrics", (("kv_cache_block_type", "max"),)),
        ),
    ),
}
