"""igw's own Endpoint Picker as a routing policy of the simulator's virtual-time replay.

The replay (``igw_sim.replay``) calls ``route(request, engines) -> index`` with plain views of the
engines (scraped metrics plus what the policy sent since); this adapter runs igw's real request
path on them — the director with an EndpointPickerConfig (the default one unless given): parsing,
candidates, admission, producers, the scheduling profile, pre-request hooks, and at completion
the response-complete hooks — so a configuration can be judged against the other policies and the
oracle in seconds. It is written against the replay's protocol by shape (igw never imports the
simulator); ``igw.cli`` hands it to the replay.

The simulated prompt is a list of named token runs; each run becomes the same text every time it
appears (four characters per token, as the approximate prefix producer assumes), so requests that
share a run share the prefix igw hashes. Time is the replay's virtual time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import orjson
import xxhash
from prometheus_client import CollectorRegistry

from igw.api.context import RequestContext
from igw.api.errors import IgwError
from igw.api.types import Endpoint, EndpointMetrics
from igw.app.epp import build_director, load_config
from igw.config.settings import EppSettings
from igw.datalayer.store import EndpointStore
from igw.observability.metrics import EppMetrics

CHARS_PER_TOKEN = 4
_ALPHABET = "abcdefghijklmnopqrstuvwxyz      "


def _run_text(key: str, tokens: int, memo: dict[tuple[str, int], str]) -> str:
    """Deterministic text of ``tokens`` tokens for the run named ``key`` (its start is stable)."""
    text = memo.get((key, tokens))
    if text is None:
        seed = xxhash.xxh64_intdigest(key.encode())
        chars = []
        for i in range(tokens * CHARS_PER_TOKEN):
            seed = (seed * 6364136223846793005 + 1442695040888963407 + i) & 0xFFFFFFFFFFFFFFFF
            chars.append(_ALPHABET[seed >> 59])
        text = memo[(key, tokens)] = "".join(chars)
    return text


class IgwRouter:
    """A replay policy that is igw's Endpoint Picker (one instance per replay)."""

    true_state = False
    needs_completions = True
    reads_metrics = True

    def __init__(self, config_text: str | None = None, *, name: str = "igw", model: str = "sim-model") -> None:
        self.name = name
        self._config_text = config_text
        self._model = model
        self._now = 0.0
        self._store = EndpointStore(pool_name="replay", clock=lambda: self._now)
        self._director: Any = None
        self._texts: dict[tuple[str, int], str] = {}
        self._open: dict[int, RequestContext] = {}
        self._index: dict[str, int] = {}
        self._ids = itertools.count()
        self.refused = 0
        """Requests igw refused (429/503): the replay then sends them to the least-loaded engine."""

    def _setup(self, engines: Sequence[Any]) -> None:
        endpoints = [Endpoint(f"10.255.{i // 250}.{i % 250 + 1}:8000", f"10.255.{i // 250}.{i % 250 + 1}", 8000)
                     for i in range(len(engines))]  # fmt: skip
        self._store.set_endpoints(endpoints)
        self._index = {e.address: i for i, e in enumerate(endpoints)}
        config = load_config(self._config_text, self._store, source="replay configuration")
        self._director = build_director(EppSettings(), self._store, EppMetrics(CollectorRegistry()), config)

    def route(self, request: Any, engines: Sequence[Any]) -> int:
        if self._director is None:
            self._setup(engines)
        self._now = engines[0].now if engines else 0.0
        states = self._store.endpoints()
        for view, state in zip(engines, states, strict=True):
            if state.metrics.scraped_at != view.scraped_at or not state.metrics.scraped_at:
                state.metrics = EndpointMetrics(
                    waiting=float(view.waiting),
                    running=float(view.running),
                    kv_usage=float(view.kv_usage),
                    block_size=int(view.block_size),
                    num_gpu_blocks=int(view.num_gpu_blocks),
                    scraped_at=float(view.scraped_at) or 1e-9,
                )
                state.dispatched_since_scrape = int(view.dispatched)
        prompt = "".join(_run_text(key, length, self._texts) for key, length in request.segments)
        model = request.lora or self._model
        body = orjson.dumps({"model": model, "prompt": prompt, "max_tokens": request.output_tokens})
        ctx = RequestContext(request_id=f"r{next(self._ids)}", path="/v1/completions", headers={}, started_at=self._now)
        try:
            decision = self._director.decide(ctx, body)
        except IgwError:
            self.refused += 1
            return min(range(len(engines)), key=lambda i: engines[i].waiting + engines[i].dispatched)
        self._open[request.request_id] = ctx
        return self._index[decision.primary]

    def on_complete(self, request: Any, engine: int) -> None:
        ctx = self._open.pop(request.request_id, None)
        if ctx is not None:
            self._director.on_stream_end(ctx)
