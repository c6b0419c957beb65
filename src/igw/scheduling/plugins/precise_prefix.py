"""``precise-prefix-cache-scorer``: the prefix each endpoint really holds, from its KV-cache events.

The engines publish every block they store and evict (vLLM's KV-cache events over ZMQ); a
subscriber keeps an index of block keys -> endpoints (:mod:`igw.datalayer.kvevents`). The keys are
recomputed from the token ids in the events, so any engine hash algorithm works, and the request's
own keys come from its token ids as the engine computes them (``token-producer``: the model's
tokenizer and chat template). Score: the endpoint's longest consecutive run of the request's full
blocks, each block weighted by the best tier that holds it (``tierWeights``, GPU 1.0 and CPU 0.8 by
default), over the request's blocks and the largest weight — in [0, 1]. Category: Affinity.

After a pick the request's blocks are entered *speculatively* for the chosen endpoint for
``speculativeTTL`` (2 s), so a burst sharing a prefix lands together before the engine's events
arrive; an event confirms or removes them.

Without tokens (no tokenizer for the model, a request that cannot be tokenized: reason
``no-tokens``), and when no endpoint holds even the request's first block (``no-holder``: a new
prefix, or one evicted everywhere; ``unheldFallback``), the scorer scores from the approximate index
of ``approx-prefix-cache-producer`` (added by default: it remembers where requests were sent) and
counts it in ``igw_precise_prefix_fallbacks_total{reason}``.

Parameters::

    kvEvents:
      bind: tcp://127.0.0.1:5557    # engines connect here (vLLM: --kv-events-config endpoint tcp://<epp>:5557)
      connect: tcp://{host}:5557    # or: connect to each endpoint's publisher ({host}, {port})
      replay: tcp://{host}:5558     # optional: each engine's replay endpoint (gaps are replayed)
      topicFilter: "kv@"
    blockSize: 16                   # default: as the events say (vLLM's block size)
    tierWeights: {gpu: 1.0, cpu: 0.8}
    speculativeTTL: 2s              # 0 disables
    maxKeys: 2000000                # index entries (LRU)
    hashSeed: ""
    unheldFallback: true            # no endpoint holds a block: score from the approximate index
    tokenizers / tokenizer / loraAdapters   # handed to the default token-producer
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import Field, model_validator

from igw.aio import Service
from igw.api.types import TOKENIZED_PROMPT_KEY, EndpointState, InferenceRequest, TokenizedPrompt
from igw.datalayer.kvevents.index import KVBlockIndex
from igw.datalayer.kvevents.metrics import KVEventMetrics
from igw.datalayer.kvevents.subscriber import KVEventSubscriber, publisher_address
from igw.framework.plugin import Duration, Handle, PluginParams
from igw.framework.registry import register
from igw.framework.requestcontrol import PreRequest
from igw.framework.scheduling import SchedulingResult, Scorer, ScorerCategory
from igw.scheduling.plugins.prefix_producer import MATCH_INFO_KEY, ApproxPrefixCacheProducer
from igw.scheduling.plugins.prefix_scorer import approx_scores

log = logging.getLogger("igw.scheduling")

KEYS_KEY = "PreciseBlockKeys"
DEFAULT_BLOCK_SIZE = 16


class KVEventsParams(PluginParams):
    bind: str | None = None
    connect: str | None = None
    replay: str | None = None
    topic_filter: str = "kv@"

    @model_validator(mode="after")
    def _one_mode(self) -> KVEventsParams:
        if self.bind is not None and self.connect is not None:
            raise ValueError("kvEvents: give bind (engines connect to the EPP) or connect (the EPP connects), not both")
        return self


def _default_kv_events() -> KVEventsParams:
    return KVEventsParams(bind="tcp://127.0.0.1:5557")


class PreciseParams(PluginParams):
    kv_events: KVEventsParams = Field(default_factory=_default_kv_events)
    block_size: int | None = Field(default=None, ge=1)
    tier_weights: dict[str, float] = Field(default_factory=lambda: {"gpu": 1.0, "cpu": 0.8})
    speculative_ttl: Duration = Field(default=2.0, alias="speculativeTTL")
    max_keys: int = Field(default=2_000_000, ge=1)
    hash_seed: str = ""
    unheld_fallback: bool = True
    tokenizers: dict[str, str] | None = None
    tokenizer: str | None = None
    lora_adapters: dict[str, str] | None = None

    @model_validator(mode="after")
    def _weights(self) -> PreciseParams:
        if not self.tier_weights or any(w < 0 for w in self.tier_weights.values()):
            raise ValueError("tierWeights: at least one tier, weights >= 0")
        if self.speculative_ttl < 0:
            raise ValueError("speculativeTTL must be >= 0")
        return self


@register
class PrecisePrefixCacheScorer(Scorer, PreRequest):
    type_name = "precise-prefix-cache-scorer"
    category = ScorerCategory.AFFINITY
    bounded = True
    Params = PreciseParams
    consumes = {TOKENIZED_PROMPT_KEY: "token-producer", MATCH_INFO_KEY: ApproxPrefixCacheProducer.type_name}

    def __init__(
        self,
        name: str | None = None,
        *,
        index: KVBlockIndex | None = None,
        subscriber: KVEventSubscriber | None = None,
        params: PreciseParams | None = None,
    ) -> None:
        super().__init__(name)
        self.params = params or PreciseParams()
        self.index = index or KVBlockIndex(hash_seed=self.params.hash_seed, max_keys=self.params.max_keys)
        self.subscriber = subscriber
        self.tier_weights = {k.lower(): v for k, v in self.params.tier_weights.items()}
        self._top_weight = max(self.tier_weights.values()) or 1.0
        self.producer_params: Mapping[str, Any] = {
            k: v
            for k, v in {
                "tokenizers": self.params.tokenizers,
                "tokenizer": self.params.tokenizer,
                "loraAdapters": self.params.lora_adapters,
            }.items()
            if v is not None
        }
        self.fallbacks: dict[str, int] = {}
        self._fallback_counter: Counter | None = None
        self._kv_metrics: KVEventMetrics | None = None
        self._handle: Handle | None = None

    @classmethod
    def from_params(cls, name: str, params: PreciseParams, handle: Handle) -> PrecisePrefixCacheScorer:
        index = KVBlockIndex(hash_seed=params.hash_seed, max_keys=params.max_keys, clock=handle.clock)
        ev = params.kv_events
        subscriber = KVEventSubscriber(index, bind=ev.bind, topic_filter=ev.topic_filter)
        scorer = cls(name, index=index, subscriber=subscriber, params=params)
        scorer._follow_pool(handle)
        return scorer

    # -- wiring ------------------------------------------------------------------------------

    def _follow_pool(self, handle: Handle) -> None:
        self._handle = handle
        self._sync_pool()
        handle.on_endpoints_change(self._sync_pool)

    def _sync_pool(self) -> None:
        """Tell the subscriber which engines to listen to (the pool's endpoints)."""
        subscriber, handle = self.subscriber, self._handle
        if subscriber is None or handle is None:
            return
        ev = self.params.kv_events
        addresses = [e.address for e in handle.endpoints()]
        if ev.connect is not None:
            subscriber.set_publishers({a: publisher_address(ev.connect, a) for a in addresses})
        else:
            subscriber.set_known_endpoints(addresses)
        if ev.replay is not None:
            subscriber.set_replay_endpoints({a: publisher_address(ev.replay, a) for a in addresses})

    def params_for_producer(self, producer_type: str) -> Mapping[str, Any]:
        return self.producer_params if producer_type == "token-producer" else {}

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._kv_metrics = KVEventMetrics(registry)
        self._kv_metrics.watch_index(self.index)
        if self.subscriber is not None:  # rebuilt (not started yet) to count into the EPP's registry
            ev = self.params.kv_events
            self.subscriber = KVEventSubscriber(
                self.index, bind=ev.bind, topic_filter=ev.topic_filter, metrics=self._kv_metrics
            )
            self._sync_pool()
        self._fallback_counter = Counter(
            "igw_precise_prefix_fallbacks",
            "Requests the precise prefix scorer scored from the approximate index, by reason",
            ["reason"],
            registry=registry,
        )

    def services(self) -> Sequence[Service]:
        return (self.subscriber,) if self.subscriber is not None else ()

    def describe(self) -> Mapping[str, Any]:
        return self.params.model_dump(by_alias=True, exclude_none=True)

    # -- request path ------------------------------------------------------------------------

    def block_size(self) -> int:
        if self.params.block_size is not None:
            return self.params.block_size
        sizes = self.index.block_sizes()
        return next(iter(sizes.values())) if sizes else DEFAULT_BLOCK_SIZE

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        prompt = request.data.get(TOKENIZED_PROMPT_KEY)
        if not isinstance(prompt, TokenizedPrompt):
            return self._fallback(request, candidates, "no-tokens")
        keys = self.index.request_keys(prompt.token_ids, self.block_size(), prompt.lora, cache_salt=prompt.cache_salt)
        request.data[KEYS_KEY] = keys
        if not keys:
            return [0.0] * len(candidates)
        matched = self.index.match(keys, [c.address for c in candidates], self.tier_weights)
        if not matched:
            if self.params.unheld_fallback:
                # Nobody holds even the first block: a new prefix, or one evicted everywhere. The
                # approximate index still knows where such requests went; sending it there again
                # keeps the prefix on one server instead of spreading copies that evict each other.
                return self._fallback(request, candidates, "no-holder")
            return [0.0] * len(candidates)
        scale = 1.0 / (len(keys) * self._top_weight)
        get = matched.get
        return [min(1.0, get(c.address, 0.0) * scale) for c in candidates]

    def _fallback(self, request: InferenceRequest, candidates: Sequence[EndpointState], reason: str) -> list[float]:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        if self._fallback_counter is not None:
            self._fallback_counter.labels(reason).inc()
        return approx_scores(request, candidates)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        ttl = self.params.speculative_ttl
        keys = request.data.get(KEYS_KEY)
        if not ttl or not keys:
            return
        if result.endpoints:
            self.index.add_speculative(result.endpoints[0].address, keys, ttl)
