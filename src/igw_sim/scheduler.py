"""The engine core: vLLM v1's scheduler over a paged KV cache, driven by an external clock.

:class:`EngineCore` is pure: it never sleeps and never reads a clock. A driver (real time:
:class:`igw_sim.engine.Engine`; a virtual-time runner later) repeats::

    plan = core.schedule(now)              # None: nothing to run
    ... let plan.duration simulated seconds pass ...
    outputs = core.complete(plan)          # tokens sampled at plan.end

Scheduling one step (``vllm/v1/core/sched/scheduler.py``, FCFS policy, chunked prefill on):

1. **Running** requests first, in admission order. Each asks for all its not-yet-computed tokens (a whole
   prompt, the rest of a chunked prompt, or the one token sampled last step), cut to the step's remaining
   token budget (``max_num_batched_tokens``). When the KV cache cannot hold them, the *last* running
   request is preempted (recompute: its blocks are freed, it goes back to the front of the waiting queue
   and starts over, usually hitting its own cached prefix), until the allocation fits or the request
   preempted itself.
2. **Waiting** requests next, only if nobody was preempted, in queue order, while the budget lasts and
   fewer than ``max_num_seqs`` run. A request first takes its longest cached prefix, then asks for the
   rest (cut to the budget). When the KV cache cannot hold it, admission stops for this step (head of
   line); so does a request that arrives after the step's start time. A LoRA request whose adapter is not among the step's adapters is skipped (not blocked) when
   ``max_loras`` adapters are already in the step.
3. Adapters of the step that are not resident are loaded into slots (least recently used evicted), each
   adding ``lora_load_ms`` to the step.

The step lasts ``profile.step_ms(...)`` (see :mod:`igw_sim.profiles`). When it completes, every request
whose known tokens are now all computed samples one token (so the step that finishes a prompt emits the
first token, and TTFT = queueing + every prefill step of uncached tokens). A request stops after
``max_tokens`` tokens (``finish_reason="length"``; there is no EOS).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum

from igw_sim.config import EngineConfig
from igw_sim.hashing import BlockHasher, hash_keys_for
from igw_sim.kvcache import KVCacheManager
from igw_sim.kvevents import KVEvent
from igw_sim.stats import E2E_BUCKETS, ITL_BUCKETS, QUEUE_BUCKETS, TTFT_BUCKETS, Histogram

__all__ = [
    "ContextLengthError",
    "EngineCore",
    "EngineStats",
    "InvalidRequestError",
    "LoraAdapter",
    "LoraError",
    "QueueFullError",
    "Request",
    "RequestStatus",
    "StepPlan",
    "TokenOutput",
]


class QueueFullError(Exception):
    """The waiting queue already holds ``max_waiting`` requests."""


class InvalidRequestError(ValueError):
    """A request the engine can never serve (empty prompt, ``max_tokens < 1``, unknown adapter)."""


class ContextLengthError(InvalidRequestError):
    """``prompt_tokens + max_tokens`` exceeds ``max_model_len`` or the whole KV cache."""


class LoraError(Exception):
    """Loading an adapter that exists, or unloading one that does not (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False, slots=True)
class Request:
    """One request's state inside the engine."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int
    arrival: float
    seed: int = 0
    lora_name: str | None = None
    lora_id: int | None = None
    lora_path: str | None = None
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens found in the prefix cache when first scheduled (-1 before that)."""
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    name: str
    path: str
    lora_id: int


@dataclass(slots=True)
class StepPlan:
    """One scheduled step: who computes how many tokens, and for how long."""

    start: float
    duration: float
    """Simulated seconds."""
    scheduled: list[tuple[Request, int]]
    prefill_tokens: int
    decode_seqs: int
    lora_loads: tuple[str, ...] = ()
    preempted: tuple[Request, ...] = ()

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class TokenOutput:
    """A token sampled at the end of a step. ``finished`` is true on the request's last token."""

    request: Request
    index: int
    token_id: int
    finished: bool


@dataclass(slots=True)
class EngineStats:
    """Counters (cumulative since construction) and latency histograms in simulated seconds."""

    requests_total: int = 0
    """Requests accepted by :meth:`EngineCore.add_request`."""
    prompt_tokens_total: int = 0
    """Prompt tokens of requests that got their first token."""
    generation_tokens_total: int = 0
    success_total: dict[str, int] = field(default_factory=dict)
    """Finished requests by finish reason."""
    aborted_total: int = 0
    """Requests aborted before their last token (client disconnects)."""
    preemptions_total: int = 0
    prefix_cache_queries_total: int = 0
    """Prompt tokens looked up in the prefix cache (first scheduling of each request)."""
    prefix_cache_hits_total: int = 0
    """Of those, tokens found."""
    lora_loads_total: int = 0
    steps_total: int = 0
    busy_seconds: float = 0.0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(QUEUE_BUCKETS))
    prefill_time: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


class EngineCore:
    """Waiting queue, running batch, KV cache and LoRA slots of one engine. Single-threaded."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config if config is not None else EngineConfig()
        cfg = self.config
        self.profile = cfg.profile
        self.hasher = BlockHasher(algo=cfg.hash_algo, seed=cfg.hash_seed, block_size=cfg.block_size)
        self._generated_id = cfg.tokenizer.generated_id
        self.kv = KVCacheManager(
            num_blocks=cfg.kv_blocks, block_size=cfg.block_size, enable_caching=cfg.enable_prefix_caching
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = EngineStats()
        self.adapters: dict[str, LoraAdapter] = {}
        self.resident_loras: OrderedDict[str, None] = OrderedDict()
        self._lora_ids = itertools.count(1)
        self._request_ids = itertools.count()
        for name, path in cfg.lora_modules:
            self.load_adapter(name, path)

    # -- requests ------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(
        self,
        *,
        prompt_ids: list[int],
        max_tokens: int,
        now: float,
        seed: int = 0,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request. Raises :class:`InvalidRequestError` (and its :class:`ContextLengthError`) or
        :class:`QueueFullError`; a rejected request leaves no trace."""
        cfg = self.config
        if max_tokens < 1:
            raise InvalidRequestError("max_tokens must be >= 1")
        if not prompt_ids:
            raise InvalidRequestError("The prompt cannot be empty.")
        total = len(prompt_ids) + max_tokens
        if total > cfg.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        if -(-total // cfg.block_size) > cfg.kv_blocks - 1:  # one is the null block
            raise ContextLengthError(
                f"The request needs {total} tokens of KV cache but the cache holds only "
                f"{(cfg.kv_blocks - 1) * cfg.block_size} tokens."
            )
        adapter = None
        if lora_name is not None:
            adapter = self.adapters.get(lora_name)
            if adapter is None:
                raise InvalidRequestError(f"The LoRA adapter `{lora_name}` is not loaded.")
        if len(self.running) >= cfg.max_num_seqs and len(self.waiting) >= cfg.max_waiting:
            raise QueueFullError(f"waiting queue is full ({cfg.max_waiting} requests)")
        req = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._request_ids)}",
            token_ids=list(prompt_ids),
            num_prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            arrival=now,
            seed=seed,
            lora_name=lora_name,
            lora_id=adapter.lora_id if adapter is not None else None,
            lora_path=adapter.path if adapter is not None else None,
            cache_salt=cache_salt,
        )
        self._extend_hashes(req)
        self.waiting.append(req)
        self.stats.requests_total += 1
        return req

    def abort(self, req: Request) -> None:
        """Drop a waiting or running request and free its blocks (no-op once finished)."""
        if req.status in (RequestStatus.FINISHED, RequestStatus.ABORTED):
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv.free(req.request_id)
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.ABORTED
        self.stats.aborted_total += 1

    # -- LoRA ----------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> LoraAdapter:
        if name in self.adapters:
            raise LoraError(400, f"The lora adapter '{name}' has already been loaded.")
        adapter = LoraAdapter(name=name, path=path, lora_id=next(self._lora_ids))
        self.adapters[name] = adapter
        return adapter

    def unload_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise LoraError(404, f"The lora adapter '{name}' cannot be found.")
        self.resident_loras.pop(name, None)

    def lora_sets(self) -> tuple[list[str], list[str]]:
        """Adapters of running requests and of waiting requests (sorted names)."""
        running = sorted({r.lora_name for r in self.running if r.lora_name})
        waiting = sorted({r.lora_name for r in self.waiting if r.lora_name})
        return running, waiting

    # -- stepping ------------------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan | None:
        """Plan the next step starting at ``now``, or ``None`` when there is nothing to compute."""
        cfg = self.config
        kv = self.kv
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        loras: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not kv.allocate_slots(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append((req, num_new))
                budget -= num_new
                if req.lora_name:
                    loras.add(req.lora_name)
                i += 1
                continue
            break  # the request preempted itself: nothing after it is left in running

        if not preempted:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                req = self.waiting[0]
                if req.arrival > now:
                    break  # the queue is in arrival order: nothing behind it has arrived either
                if req.lora_name and req.lora_name not in loras and len(loras) >= cfg.max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
                hits, num_hit_tokens = kv.get_computed_blocks(req)
                num_new = min(req.num_tokens - num_hit_tokens, budget)
                if not kv.allocate_slots(req, num_new, hits):
                    break
                self.waiting.popleft()
                req.num_computed_tokens = num_hit_tokens
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit_tokens
                    req.scheduled_time = now
                    self.stats.queue_time.observe(now - req.arrival)
                    self.stats.prefix_cache_queries_total += req.num_tokens
                    self.stats.prefix_cache_hits_total += num_hit_tokens
                scheduled.append((req, num_new))
                budget -= num_new
                if req.lora_name:
                    loras.add(req.lora_name)
            self.waiting.extendleft(reversed(skipped))

        if not scheduled:
            return None
        loads = self._load_loras(loras)
        prefill_tokens = decode_seqs = context_tokens = 0
        for req, num_new in scheduled:
            context_tokens += req.num_computed_tokens
            if num_new == 1 and req.num_output_tokens > 0 and req.num_computed_tokens == req.num_tokens - 1:
                decode_seqs += 1
            else:
                prefill_tokens += num_new
        ms = self.profile.step_ms(prefill_tokens=prefill_tokens, decode_seqs=decode_seqs, context_tokens=context_tokens)
        ms += len(loads) * cfg.lora_load_ms
        return StepPlan(
            start=now,
            duration=ms / 1000.0,
            scheduled=scheduled,
            prefill_tokens=prefill_tokens,
            decode_seqs=decode_seqs,
            lora_loads=loads,
            preempted=tuple(preempted),
        )

    def complete(self, plan: StepPlan) -> list[TokenOutput]:
        """Apply a step at its end time: advance computed tokens, sample, finish requests."""
        now = plan.end
        stats = self.stats
        stats.steps_total += 1
        stats.busy_seconds += plan.duration
        outputs: list[TokenOutput] = []
        finished = False
        for req, num_new in plan.scheduled:
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            req.num_computed_tokens += num_new
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prompt chunk: no token yet
            index = req.num_output_tokens
            token_id = self._generated_id(req.seed, index)
            req.token_ids.append(token_id)
            self._extend_hashes(req)
            stats.generation_tokens_total += 1
            if req.first_token_time is None:
                req.first_token_time = now
                stats.ttft.observe(now - req.arrival)
                stats.prompt_tokens_total += req.num_prompt_tokens
                if req.scheduled_time is not None:
                    stats.prefill_time.observe(now - req.scheduled_time)
            elif req.last_token_time is not None:
                stats.itl.observe(now - req.last_token_time)
            req.last_token_time = now
            done = req.num_output_tokens >= req.max_tokens
            if done:
                req.status = RequestStatus.FINISHED
                req.finish_time = now
                self.kv.free(req.request_id)
                stats.success_total["length"] = stats.success_total.get("length", 0) + 1
                stats.e2e.observe(now - req.arrival)
                finished = True
            outputs.append(TokenOutput(request=req, index=index, token_id=token_id, finished=done))
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return outputs

    def take_kv_events(self) -> list[KVEvent]:
        return self.kv.take_events()

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    # -- internals -----------------------------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.stats.preemptions_total += 1

    def _load_loras(self, needed: set[str]) -> tuple[str, ...]:
        resident = self.resident_loras
        loads = tuple(sorted(name for name in needed if name not in resident))
        for name in loads:
            if len(resident) >= self.config.max_loras:
                victim = next((n for n in resident if n not in needed), None)
                if victim is not None:
                    del resident[victim]
            resident[name] = None
        for name in sorted(needed):
            resident.move_to_end(name)
        self.stats.lora_loads_total += len(loads)
        return loads

    def _extend_hashes(self, req: Request) -> None:
        size = self.config.block_size
        hashes = req.block_hashes
        tokens = req.token_ids
        while (len(hashes) + 1) * size <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            keys = hash_keys_for(i, req.lora_name, req.lora_path, req.cache_salt)
            hashes.append(self.hasher.hash_block(parent, tokens[i * size : (i + 1) * size], keys))
