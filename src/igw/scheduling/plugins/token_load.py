"""Token-weighted load: ``inflight-load-producer`` counts it, ``token-load-scorer`` reads it.

**inflight-load-producer** (DataProducer + PreRequest + ResponseCompleteHook) keeps, per
endpoint address, the estimated tokens (:func:`igw.api.load.estimate_tokens`) of the requests
this EPP routed there that have not finished, in an :class:`igw.api.load.InflightLedger`:
``pre_request`` charges the primary pick, ``on_response_complete`` releases that charge, a
pool change drops removed endpoints. ``prepare`` writes ``request.data["InflightLoad"]``:
``{address: tokens}`` for every candidate (0 when idle). No parameters.

**token-load-scorer** consumes ``InflightLoad`` (default producer: ``inflight-load-producer``).
Score: ``1 - min(tokens, T) / T`` with ``T = queueThresholdTokens`` (default 4,194,304, > 0).
When the data is missing (no producer, or it failed for this request) every candidate scores
1.0: no signal, so no preference. Category: Balance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from igw.api.load import InflightLedger, estimate_tokens
from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.requestcontrol import DataProducer, PreRequest, ResponseCompleteHook, ResponseHeadersHook
from igw.framework.scheduling import SchedulingResult, Scorer, ScorerCategory

INFLIGHT_LOAD = "InflightLoad"


@register
class InflightLoadProducer(DataProducer, PreRequest, ResponseHeadersHook, ResponseCompleteHook):
    type_name = "inflight-load-producer"
    produces = frozenset({INFLIGHT_LOAD})

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.ledger = InflightLedger()

    @property
    def load(self) -> dict[str, int]:
        """In-flight tokens per endpoint address (only addresses with a load)."""
        return self.ledger.load

    @classmethod
    def from_params(cls, name: str, params: Any, handle: Handle) -> InflightLoadProducer:
        producer = cls(name)
        handle.on_endpoints_change(lambda: producer.retain({s.address for s in handle.endpoints()}))
        return producer

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        request.data[INFLIGHT_LOAD] = self.ledger.load  # live: read in the same synchronous pass

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if result.endpoints:
            self.ledger.charge(request.key, result.endpoints[0].address, estimate_tokens(request))

    def on_response_headers(
        self, request: InferenceRequest, endpoint: str | None, status: int | None
    ) -> Mapping[str, str] | None:
        if endpoint is not None:  # a fallback served it: the load is there now
            self.ledger.move(request.key, endpoint)
        return None

    def on_response_complete(self, request: InferenceRequest, endpoint: str) -> None:
        self.ledger.release(request.key)

    def retain(self, addresses: set[str]) -> None:
        """Forget the load of every endpoint not in ``addresses`` (the pool changed)."""
        self.ledger.retain(addresses)


class TokenLoadParams(PluginParams):
    queue_threshold_tokens: int = Field(default=4_194_304, gt=0)
    """In-flight tokens at which the score reaches 0."""


@register
class TokenLoadScorer(Scorer):
    type_name = "token-load-scorer"
    category = ScorerCategory.BALANCE
    bounded = True
    Params = TokenLoadParams
    consumes = {INFLIGHT_LOAD: InflightLoadProducer.type_name}

    def __init__(self, name: str | None = None, *, queue_threshold_tokens: int = 4_194_304) -> None:
        super().__init__(name)
        if queue_threshold_tokens <= 0:
            raise ValueError(f"token-load-scorer: queueThresholdTokens must be > 0, got {queue_threshold_tokens}")
        self.threshold = queue_threshold_tokens

    @classmethod
    def from_params(cls, name: str, params: TokenLoadParams, handle: Handle) -> TokenLoadScorer:
        return cls(name, queue_threshold_tokens=params.queue_threshold_tokens)

    def describe(self) -> Mapping[str, Any]:
        return {"queueThresholdTokens": self.threshold}

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        load = request.data.get(INFLIGHT_LOAD)
        if not isinstance(load, Mapping):
            return [1.0] * len(candidates)
        t = float(self.threshold)
        return [1.0 - min(float(load.get(c.address, 0)), t) / t for c in candidates]
