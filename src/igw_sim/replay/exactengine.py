"""The exact engine: the real-time simulator's own :class:`~igw_sim.scheduler.EngineCore`, in virtual time.

:class:`ExactEngine` drives an unmodified ``EngineCore`` step by step (``schedule(now)`` then
``complete(plan)`` at ``plan.end``) on the replay's clock, the way :class:`~igw_sim.engine.Engine` drives
it on the event loop's. Prompts are materialised as token ids and hashed block by block, so it is exact
(KV cache, LoRA slots, preemption) and slow: use it for small replays and to check the
:class:`~igw_sim.replay.fastengine.FastEngine` (``tests/sim/test_sim_replay_agreement.py``).

Token ids of a segment ``(key, length)``: when ``key`` is some request's ``output_key``, the ids that
request generates (:func:`igw_sim.tokenizer.generated_id` with the seed :func:`output_seed` of the key),
so that a chat's next turn quotes the answer exactly; otherwise :func:`igw_sim.tokenizer.synthetic_ids`
salted with the key and the length.
"""

from __future__ import annotations

import math
import zlib

from igw_sim import tokenizer
from igw_sim.config import EngineConfig
from igw_sim.replay.fastengine import RejectedError
from igw_sim.replay.requests import SimRequest
from igw_sim.replay.results import Recorder
from igw_sim.scheduler import (
    ContextLengthError,
    EngineCore,
    InvalidRequestError,
    QueueFullError,
    Request,
    StepPlan,
)

__all__ = ["ExactEngine", "Materialiser", "output_seed"]


def output_seed(key: str) -> int:
    """The generation seed of a request whose answer is quoted as ``key``."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF


class Materialiser:
    """Token ids of segments, shared by every exact engine of a replay (it learns the output keys)."""

    def __init__(self) -> None:
        self.output_keys: set[str] = set()
        self._memo: dict[tuple[str, int], list[int]] = {}

    def seed(self, request: SimRequest) -> int:
        if request.output_key is None:
            return request.request_id & 0x7FFFFFFF
        self.output_keys.add(request.output_key)
        return output_seed(request.output_key)

    def segment(self, key: str, length: int) -> list[int]:
        ids = self._memo.get((key, length))
        if ids is None:
            if key in self.output_keys:
                seed = output_seed(key)
                ids = [tokenizer.generated_id(seed, i) for i in range(length)]
            else:
                salt = zlib.crc32(f"{key}\x00{length}".encode("utf-8", "surrogatepass"))
                ids = tokenizer.synthetic_ids(length, salt)
            if len(self._memo) < 4096:
                self._memo[(key, length)] = ids
        return ids

    def prompt(self, request: SimRequest) -> list[int]:
        out: list[int] = []
        for key, length in request.segments:
            out.extend(self.segment(key, length))
        return out


class ExactEngine:
    """One :class:`EngineCore` in virtual time, with the same driving interface as ``FastEngine``."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        index: int = 0,
        recorder: Recorder | None = None,
        materialiser: Materialiser | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.recorder = recorder if recorder is not None else Recorder(index + 1)
        self.materialiser = materialiser if materialiser is not None else Materialiser()
        self.core = EngineCore(config)
        self.profile = self.core.profile
        self._sims: dict[str, SimRequest] = {}
        self._plan: StepPlan | None = None
        self._next: float | None = None

    # -- what routers and scrapes read -------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.core.waiting)

    @property
    def num_running(self) -> int:
        return len(self.core.running)

    @property
    def kv_usage(self) -> float:
        return self.core.kv.usage

    @property
    def idle(self) -> bool:
        return self._plan is None and self._next is None

    @property
    def prefix_queries(self) -> int:
        return self.core.stats.prefix_cache_queries_total

    @property
    def prefix_hits(self) -> int:
        return self.core.stats.prefix_cache_hits_total

    @property
    def preemptions(self) -> int:
        return self.core.stats.preemptions_total

    @property
    def steps(self) -> int:
        return self.core.stats.steps_total

    @property
    def busy_s(self) -> float:
        return self.core.stats.busy_seconds

    @property
    def generation_tokens(self) -> int:
        return self.core.stats.generation_tokens_total

    def cached_prefix_tokens(self, request: SimRequest) -> int:
        ids = self.materialiser.prompt(request)
        probe = Request(
            request_id="probe",
            token_ids=ids,
            num_prompt_tokens=len(ids),
            max_tokens=request.output_tokens,
            arrival=0.0,
            lora_name=request.lora,
            block_hashes=self.core.hasher.hash_prefix(ids, lora_name=request.lora),
        )
        return self.core.kv.get_computed_blocks(probe)[1]

    def predicted_ttft(self, request: SimRequest, now: float) -> float:
        """The same estimate as :meth:`FastEngine.predicted_ttft`, from the core's state."""
        self.advance(now)
        core = self.core
        cfg = self.config
        plan = self._plan
        wait = max(plan.end - now, 0.0) if plan is not None else 0.0
        decoders = [r for r in core.running if r.num_output_tokens > 0]
        ctx = sum(r.num_computed_tokens for r in decoders)
        ahead = sum(r.num_tokens - r.num_computed_tokens for r in core.waiting)
        ahead += sum(r.num_tokens - r.num_computed_tokens for r in core.running if r.num_output_tokens == 0)
        tokens = ahead + request.prompt_tokens - self.cached_prefix_tokens(request)
        chunk = max(cfg.max_num_batched_tokens - len(decoders), 1)
        step_s = (
            self.profile.step_ms(prefill_tokens=min(tokens, chunk), decode_seqs=len(decoders), context_tokens=ctx)
            / 1000.0
        )
        return wait + math.ceil(tokens / chunk) * step_s

    # -- driving -----------------------------------------------------------------------------------

    def submit(self, request: SimRequest, now: float) -> None:
        self.advance(now)
        core = self.core
        if request.lora is not None and request.lora not in core.adapters:
            core.load_adapter(request.lora, f"/sim/{request.lora}")
        try:
            req = core.add_request(
                prompt_ids=self.materialiser.prompt(request),
                max_tokens=request.output_tokens,
                now=now,
                seed=self.materialiser.seed(request),
                lora_name=request.lora,
                request_id=str(request.request_id),
            )
        except QueueFullError as exc:
            raise RejectedError(429, str(exc)) from None
        except (ContextLengthError, InvalidRequestError) as exc:
            raise RejectedError(400, str(exc)) from None
        self._sims[req.request_id] = request
        rec = self.recorder
        if len(core.waiting) > rec.max_waiting[self.index]:
            rec.max_waiting[self.index] = len(core.waiting)
        if self._plan is None and self._next is None:
            self._next = now

    def advance(self, t: float) -> None:
        core = self.core
        while True:
            plan = self._plan
            if plan is not None:
                if plan.end > t:
                    return
                self._plan = None
                self._next = plan.end
                for out in core.complete(plan):
                    if out.finished:
                        req = out.request
                        sim = self._sims.pop(req.request_id)
                        assert req.first_token_time is not None
                        assert req.finish_time is not None
                        self.recorder.finish(
                            sim, self.index, req.first_token_time, req.finish_time, req.num_cached_tokens
                        )
            s = self._next
            if s is None or s >= t:
                return
            self._plan = core.schedule(s)
            if self._plan is None:
                self._next = None

    def next_wake(self) -> float:
        if self._plan is not None:
            return self._plan.end
        return self._next if self._next is not None else math.inf
