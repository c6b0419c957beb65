"""``lora-affinity-scorer``: send a LoRA request where its adapter is loaded, or can be.

Consumes the request's adapter (``request.effective_model``: the model after rewrites) and
each endpoint's scraped LoRA state (vLLM's ``vllm:lora_requests_info``: ``max_lora``,
``running_adapters``, ``waiting_adapters``). Score, first match wins (the reference order)::

    1.0  the adapter is running there (loaded: no swap)
    0.8  not running, but a slot is free: len(running | waiting) < max_lora
    0.6  the adapter is already waiting there (it will be loaded; the request joins it)
    0.0  otherwise (every slot taken by other adapters: the request waits for a swap)

Slots are counted over the *union* of running and waiting adapters: an adapter with both
running and waiting requests holds one slot. (The reference adds the two lengths, which
counts such an adapter twice and reports a full server where a slot is still free.)

Choices where the reference is silent or unhelpful:

* **No LoRA metric** (``max_lora is None``: SGLang, TensorRT-LLM, vLLM without
  ``--enable-lora``, or not scraped yet) scores 0.0 unless the adapter is seen running
  there, as in the reference (there the slot
  count is 0, so only the last case can match). 0.0 rather than a mid value is deliberate:
  in a pool where no endpoint reports LoRA state every endpoint scores 0, so the scorer adds
  nothing to any total and changes no pick, not even the draws of ``weighted-random-picker``,
  where a constant added to every total would flatten the odds. In a mixed pool an endpoint
  that reports nothing ranks with the full ones, below an endpoint known to have room.
* **Request without a model** (``GET /v1/models``): 0.0 everywhere (no signal).
* **Base model**: the request does not say whether its model is a base model or an adapter,
  and the scraped metric does not name the base model, so a base model is scored like an
  adapter that is loaded nowhere: 0.8 where a slot is free, else 0.0 (reference behaviour).
  In a pool where every server has a free slot, this is uniform. When some servers are full
  of adapters, base-model traffic leans towards the others. The scorer cannot tell these
  apart; weight it accordingly in pools that mostly serve the base model.

No parameters. Category: Affinity.
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory

ACTIVE = 1.0
FREE_SLOT = 0.8
WAITING = 0.6
NO_ROOM = 0.0
NO_SIGNAL = 0.0


@register
class LoraAffinityScorer(Scorer):
    type_name = "lora-affinity-scorer"
    category = ScorerCategory.AFFINITY
    bounded = True

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        adapter = request.effective_model
        if adapter is None:
            return [NO_SIGNAL] * len(candidates)
        out: list[float] = []
        for c in candidates:
            m = c.metrics
            if adapter in m.running_adapters:
                out.append(ACTIVE)
            elif m.max_lora is None:
                out.append(NO_SIGNAL)
            elif len(m.running_adapters | m.waiting_adapters) < m.max_lora:
                out.append(FREE_SLOT)
            elif adapter in m.waiting_adapters:
                out.append(WAITING)
            else:
                out.append(NO_ROOM)
        return out
