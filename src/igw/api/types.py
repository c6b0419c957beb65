"""Hot-path value types: endpoints, their metric snapshots, parsed requests.

They are frozen and slotted: the data layer replaces a snapshot instead of mutating it, so a
scheduling pass never sees half-updated numbers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Engine(StrEnum):
    """Model-server kinds whose metric names igw knows."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TRTLLM_SERVE = "trtllm-serve"
    TRITON_TENSORRT_LLM = "triton-tensorrt-llm"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model-server port: ``address`` is ``host:port`` exactly as the proxy must dial it."""

    address: str
    host: str
    port: int
    engine: str | None = None
    """The engine kind the pool declares (an :class:`Engine` value), or ``None``: the data
    layer then uses the engine label, else its default engine."""
    models: frozenset[str] | None = None
    """Served model names, or ``None`` when the pool does not declare them (any model goes)."""
    labels: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def parse_address(address: str) -> tuple[str, int]:
        """Split ``host:port`` / ``[v6]:port``; raise ``ValueError`` with a clear message."""
        text = address.strip()
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"endpoint {address!r} is not host:port")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"endpoint {address!r}: port {port} is out of range")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ValueError(f"endpoint {address!r}: unbalanced brackets")
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"endpoint {address!r}: write IPv6 hosts as [addr]:port")
        return host, port


def format_address(host: str, port: int) -> str:
    """The ``host:port`` form proxies parse (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """What the last scrape of an endpoint said. ``scraped_at`` is a ``time.monotonic()`` value."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    """KV-cache utilisation in [0, 1]."""
    block_size: int | None = None
    """KV-cache block size in tokens (``cache_config_info``), when the server reports it."""
    num_gpu_blocks: int | None = None
    scraped_at: float = 0.0
    """0.0 means never scraped."""
    max_lora: int | None = None
    """LoRA adapters the server can hold at once (``lora_requests_info``), when reported."""
    running_adapters: frozenset[str] = frozenset()
    """LoRA adapters of running requests."""
    waiting_adapters: frozenset[str] = frozenset()
    """LoRA adapters of waiting requests."""


NEVER_SCRAPED = EndpointMetrics()


class EndpointState:
    """An endpoint plus what changes about it (metrics, load); the data layer's store owns it."""

    __slots__ = ("address", "dispatched_since_scrape", "endpoint", "failures", "inflight", "last_error", "metrics")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.address = endpoint.address
        """``host:port`` (a plain attribute: scorers read it for every candidate)."""
        self.metrics: EndpointMetrics = NEVER_SCRAPED
        self.inflight = 0
        """Requests this EPP sent there that have not finished yet."""
        self.dispatched_since_scrape = 0
        """Requests sent there since the last successful scrape (not yet in its queue numbers)."""
        self.last_error: str | None = None
        """Why the last scrape failed; ``None`` after a success."""
        self.failures = 0
        """Scrapes failed in a row."""

    def age(self, now: float) -> float:
        """Seconds since the last successful scrape (infinite if never scraped)."""
        scraped = self.metrics.scraped_at
        return now - scraped if scraped else float("inf")

    def __repr__(self) -> str:
        return f"EndpointState({self.address}, inflight={self.inflight}, metrics={self.metrics})"


@dataclass(slots=True)
class InferenceRequest:
    """A parsed OpenAI-style request, as the scheduler sees it."""

    request_id: str
    model: str | None
    """The model the client asked for."""
    path: str
    body_size: int
    stream: bool = False
    prompt_text: str | None = None
    """Prompt text (completions) or a rendering of the messages (chat); None when not known."""
    headers: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    """From the request's InferenceObjective; below zero means sheddable."""
    objective: str | None = None
    """The InferenceObjective named by the request, if any."""
    target_model: str | None = None
    """The model to send to the server (after rewrites); ``None``: the same as ``model``."""
    body: dict[str, Any] | None = None
    """The decoded JSON body (read-only for plugins), when the parser decoded one."""
    data: dict[str, Any] = field(default_factory=dict)
    """Per-request data written by DataProducers, keyed by data name (``PrefixCacheMatchInfo``...)."""
    key: int = field(default_factory=itertools.count().__next__)
    """Unique in this process (client-chosen request ids may repeat): for per-request bookkeeping."""

    @property
    def effective_model(self) -> str | None:
        return self.target_model or self.model


TOKENIZED_PROMPT_KEY = "TokenizedPrompt"
"""``request.data`` key of the :class:`TokenizedPrompt` the ``token-producer`` makes."""


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """The prompt's token ids exactly as the model server will see them (chat template applied)."""

    token_ids: Sequence[int]
    model: str
    """The model the request is for (after rewrites)."""
    lora: str | None = None
    """The LoRA adapter, when ``model`` is one (the engine folds it into every block hash)."""
    cache_salt: str | None = None
    """vLLM's ``cache_salt`` request field (folded into the first block's hash)."""
