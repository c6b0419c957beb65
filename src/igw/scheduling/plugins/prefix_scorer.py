"""``prefix-cache-scorer``: prefer endpoints that probably hold the prompt's prefix in KV cache.

Consumes ``PrefixCacheMatchInfo`` (default producer: ``approx-prefix-cache-producer``).
Score: matched leading blocks / blocks of the request; 0 when there is no data or the request
has no block (too short). Category: Affinity.

Parameters: none of its own. Reference files written before the index moved to the producer
give ``maxPrefixBlocksToMatch``, ``lruCapacityPerServer`` (and ``blockSizeTokens``,
``autoTune``) here; they are accepted and kept in :attr:`PrefixCacheScorer.producer_params`
so the loader can hand them to the producer it adds by default; configure them on
``approx-prefix-cache-producer`` instead. ``blockSize`` (characters) is refused as on the
producer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory
from igw.scheduling.plugins.prefix_producer import (
    MATCH_INFO_KEY,
    ApproxPrefixCacheProducer,
    PrefixCacheMatchInfo,
    deprecated_block_size_error,
)

log = logging.getLogger("igw.scheduling")


class LegacyScorerParams(PluginParams):
    """The producer's parameters as older reference files put them on the scorer (all optional)."""

    block_size_tokens: int | None = None
    max_prefix_blocks_to_match: int | None = None
    max_prefix_tokens_to_match: int | None = None
    lru_capacity_per_server: int | None = None
    auto_tune: bool | None = None
    hash_block_size: int | None = Field(default=None, ge=1)
    """Reference v1.0 (characters): becomes ``blockSizeTokens = hashBlockSize / 4``."""
    block_size: int | None = None


@register
class PrefixCacheScorer(Scorer):
    type_name = "prefix-cache-scorer"
    category = ScorerCategory.AFFINITY
    bounded = True
    Params = LegacyScorerParams
    consumes = {MATCH_INFO_KEY: ApproxPrefixCacheProducer.type_name}

    def __init__(self, name: str | None = None, *, producer_params: Mapping[str, Any] | None = None) -> None:
        super().__init__(name)
        self.producer_params: Mapping[str, Any] = dict(producer_params or {})
        """Legacy producer parameters given on the scorer (camelCase), for the default producer."""

    @classmethod
    def from_params(cls, name: str, params: LegacyScorerParams, handle: Handle) -> PrefixCacheScorer:
        if params.block_size is not None:
            raise ValueError(deprecated_block_size_error(params.block_size))
        legacy = params.model_dump(by_alias=True, exclude_none=True)
        hash_block_size = legacy.pop("hashBlockSize", None)
        if hash_block_size is not None:
            log.warning("%s: hashBlockSize (characters) is deprecated; using blockSizeTokens %d",
                        name, max(1, hash_block_size // 4))  # fmt: skip
            legacy.setdefault("blockSizeTokens", max(1, hash_block_size // 4))
        return cls(name, producer_params=legacy)

    def describe(self) -> Mapping[str, Any]:
        return {"producerParams": dict(self.producer_params)} if self.producer_params else {}

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        return approx_scores(request, candidates)


def approx_scores(request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
    """Matched leading blocks / request blocks per candidate, from the approximate producer's data
    (0 everywhere without it)."""
    info = request.data.get(MATCH_INFO_KEY)
    if not isinstance(info, PrefixCacheMatchInfo) or not info.total_blocks or not info.matched:
        return [0.0] * len(candidates)
    matched = info.matched.get
    total = info.total_blocks
    return [matched(c.address, 0) / total for c in candidates]
