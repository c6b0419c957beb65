"""The model servers of a benchmark: a simulated fleet or real vLLM CPU engines, and their ``/metrics``.

:class:`SimFleetSpec` starts ``python -m igw_sim`` (one process, N endpoints on free loopback ports)
with a latency profile, a KV-cache size and a time dilation; every arm of a comparison gets a fresh
fleet from the same spec, so no arm inherits another's cache. :class:`VllmFleetSpec` starts real vLLM
CPU engines through ``tools/vllm/serve.py`` (they take half a minute to start, so one fleet serves every
arm, its prefix caches emptied with ``POST /reset_prefix_cache`` before each). :func:`scrape_counters` reads the
routing-relevant counters of any vLLM-compatible server (the simulator or a real vLLM engine), parsed
with prometheus-client's parser; the difference of two scrapes gives a step's prefix-cache hit rate and
each endpoint's share of the requests.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from igw_bench.procs import HOST, Child, free_ports

__all__ = [
    "COUNTERS",
    "Counters",
    "FleetSpec",
    "SimFleetSpec",
    "VllmFleetSpec",
    "reset_prefix_caches",
    "scrape_counters",
    "start_fleet",
]

SIM_READY = "igw-sim: ready"
VLLM_READY = "engine(s) ready in"
SERVE_PY = Path(__file__).resolve().parents[2] / "tools" / "vllm" / "serve.py"
"""The real engines' launcher (a repository tool: the vLLM fleet needs a checkout and ``make vllm-env``)."""

COUNTERS = {
    "queries": ("vllm:prefix_cache_queries_total", "sglang:prefix_cache_queries_total"),
    "hits": ("vllm:prefix_cache_hits_total", "sglang:prefix_cache_hits_total"),
    "requests": ("vllm:request_success_total", "sglang:num_requests_total"),
    "prompt_tokens": ("vllm:prompt_tokens_total", "sglang:prompt_tokens_total"),
    "generation_tokens": ("vllm:generation_tokens_total", "sglang:generation_tokens_total"),
    "preemptions": ("vllm:num_preemptions_total",),
}
"""What a step reads from each server: our name -> the sample names that count it (summed over labels)."""

Counters = dict[str, float]


@dataclass(frozen=True, slots=True)
class SimFleetSpec:
    """A simulated fleet: ``servers`` endpoints with one engine configuration."""

    servers: int = 8
    profile: str = "h100-llama3-8b"
    kv_blocks: int | None = 8192
    time_dilation: float = 5.0
    model: str = "sim-model"
    loras: tuple[str, ...] = ()
    max_loras: int | None = None
    tokenizer: Path | None = None
    """A Hugging Face tokenizer directory the servers tokenize with (``igw sim --tokenizer``)."""
    kv_events_endpoint: str | None = None
    """Where the servers publish their KV-cache events (a precise-prefix arm binds it)."""
    extra_args: tuple[str, ...] = field(default=())

    def argv(self, ports: Iterable[int]) -> list[str]:
        argv = [
            sys.executable, "-m", "igw_sim", "--ports", ",".join(str(p) for p in ports), "--host", HOST,
            "--model", self.model, "--profile", self.profile, "--time-dilation", f"{self.time_dilation:g}",
        ]  # fmt: skip
        if self.kv_blocks is not None:
            argv += ["--kv-blocks", str(self.kv_blocks)]
        if self.loras:
            argv += ["--lora-modules", *(f"{name}=/dev/null" for name in self.loras)]
        if self.max_loras is not None:
            argv += ["--max-loras", str(self.max_loras)]
        if self.tokenizer is not None:
            argv += ["--tokenizer", str(self.tokenizer)]
        if self.kv_events_endpoint is not None:
            argv += ["--kv-events-endpoint", self.kv_events_endpoint]
        return [*argv, *self.extra_args]

    fresh_per_arm = True

    @property
    def kv_tokens(self) -> int | None:
        return self.servers * self.kv_blocks * 16 if self.kv_blocks else None

    def describe(self) -> dict[str, object]:
        return {
            "kind": "simulated vLLM (igw sim)",
            "servers": self.servers,
            "profile": self.profile,
            "kv_blocks": self.kv_blocks,
            "time_dilation": self.time_dilation,
            "loras": list(self.loras),
            "max_loras": self.max_loras,
            "tokenizer": str(self.tokenizer) if self.tokenizer else "igw-sim word tokenizer",
            "kv_events_endpoint": self.kv_events_endpoint,
        }


@dataclass(frozen=True, slots=True)
class VllmFleetSpec:
    """Real vLLM CPU engines (``make vllm-env`` installs vLLM and builds the tiny model)."""

    servers: int = 3
    home: Path = Path.home() / ".cache" / "igw-vllm"
    model: str = "tiny"
    num_blocks: int = 256
    block_size: int = 32
    max_num_seqs: int = 8
    loras: tuple[str, ...] = ()
    """Adapter names; each is served from ``<home>/lora-a``."""
    max_loras: int = 2
    time_dilation: float = 1.0
    fresh_per_arm = False

    @property
    def kv_tokens(self) -> int | None:
        return self.servers * self.num_blocks * self.block_size

    def argv(self, ports: Iterable[int]) -> list[str]:
        argv = [
            sys.executable, str(SERVE_PY), "run", "--ports", ",".join(str(p) for p in ports),
            "--model-dir", str(self.home / "tiny-model"), "--served-name", self.model,
            "--python", str(self.home / "venv" / "bin" / "python"), "--num-blocks", str(self.num_blocks),
            "--block-size", str(self.block_size), "--max-num-seqs", str(self.max_num_seqs),
        ]  # fmt: skip
        if self.loras:
            argv += ["--lora-modules", *(f"{n}={self.home / 'lora-a'}" for n in self.loras)]
            argv += ["--max-loras", str(self.max_loras)]
        return argv

    def missing(self) -> str | None:
        """Why this fleet cannot start here (``None`` when it can)."""
        if not SERVE_PY.is_file():
            return f"{SERVE_PY} is missing (the vLLM fleet runs from a repository checkout)"
        for need in (self.home / "venv" / "bin" / "python", self.home / "tiny-model" / "config.json"):
            if not need.exists():
                return f"{need} is missing: run `make vllm-env` first"
        return None

    def describe(self) -> dict[str, object]:
        return {
            "kind": "vLLM CPU engines (tiny local model)",
            "servers": self.servers,
            "profile": "real",
            "kv_blocks": self.num_blocks,
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "time_dilation": self.time_dilation,
            "loras": list(self.loras),
            "max_loras": self.max_loras,
        }


FleetSpec = SimFleetSpec | VllmFleetSpec


async def start_fleet(spec: FleetSpec, log_path: Path, *, timeout: float | None = None) -> tuple[Child, list[str]]:
    """Start the fleet; the running child and its endpoints (``host:port``)."""
    ports = free_ports(spec.servers)
    if isinstance(spec, VllmFleetSpec):
        problem = spec.missing()
        if problem is not None:
            raise RuntimeError(problem)
        child = Child("vLLM engines", spec.argv(ports), log_path)
        ready, limit = VLLM_READY, timeout or 400.0
    else:
        child = Child("simulated fleet", spec.argv(ports), log_path)
        ready, limit = SIM_READY, timeout or 60.0
    try:
        await child.start(ready, timeout=limit)
    except BaseException:
        await child.stop(timeout=40.0)
        raise
    return child, [f"{HOST}:{p}" for p in ports]


async def reset_prefix_caches(endpoints: list[str], *, timeout: float = 30.0) -> None:
    """``POST /reset_prefix_cache`` on every endpoint (vLLM needs ``VLLM_SERVER_DEV_MODE=1``)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        for address in endpoints:
            async with http.post(f"http://{address}/reset_prefix_cache") as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{address}: POST /reset_prefix_cache answered {resp.status}")


def parse_counters(text: str) -> Counters:
    """The :data:`COUNTERS` of one exposition (missing ones are absent)."""
    wanted = {name: ours for ours, names in COUNTERS.items() for name in names}
    found: Counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            ours = wanted.get(sample.name)
            if ours is not None:
                found[ours] = found.get(ours, 0.0) + float(sample.value)
    return found


async def scrape_counters(endpoints: list[str], *, timeout: float = 5.0) -> dict[str, Counters]:
    """Every endpoint's counters (an endpoint that does not answer maps to ``{}``)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:

        async def one(address: str) -> Counters:
            try:
                async with http.get(f"http://{address}/metrics") as resp:
                    return parse_counters(await resp.text()) if resp.status == 200 else {}
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return {}

        values = await asyncio.gather(*(one(a) for a in endpoints))
    return dict(zip(endpoints, values, strict=True))


def counter_delta(before: dict[str, Counters], after: dict[str, Counters]) -> dict[str, Counters]:
    """``after - before`` per endpoint and counter (a counter that went down — a restart — counts from 0)."""
    out: dict[str, Counters] = {}
    for endpoint, values in after.items():
        old = before.get(endpoint, {})
        out[endpoint] = {k: (v - old.get(k, 0.0)) if v >= old.get(k, 0.0) else v for k, v in values.items()}
    return out
