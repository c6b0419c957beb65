"""The oracle: the policy the realistic ones are compared with, from the engines' true state.

:class:`OracleRouter` reads live :class:`~igw_sim.replay.routers.EngineView` s (``true_state``) and hears
of every completion (``needs_completions``). For each engine ``e`` it prices the request ``r``:

``cost(e) = predicted TTFT + miss_weight x prefill_s_per_token x miss(e) + placement(e)``

* **Predicted TTFT** is the engine's own prediction (``predicted_ttft``): the in-flight step, the
  uncached prefill queued ahead, its own uncached prefill, the wait for a running slot.
* **Miss** is ``r``'s prompt tokens that neither the cache nor the queue will hold. ``cached_prefix_tokens``
  only sees blocks already computed, so a prefix sent a moment ago and still queued looks absent; the
  oracle also counts the prefix of the requests it sent to ``e`` that have not finished (computed before
  ``r``, or alongside it, so ``r`` hits them). Without this, the second request of a new group, arriving
  while the first one waits, is placed anew and the group ends up on two engines (W1 at 50 QPS: 21 of 210
  groups). The miss weight prices what a miss does to *other* requests: the prefill work every later
  request on ``e`` waits for, and the cached blocks it evicts (16, as in the previous oracle).
* **Placement** is the future load that follows the choice. The requests of a *prefix group* keep
  going where the group is cached, so choosing an engine for a request whose prefix is cached nowhere
  chooses where the whole group's later traffic goes; a greedy TTFT minimiser picks whichever engine is
  briefly quiet and leaves engines with 25 to 32 groups (W1), and since TTFT grows much faster than
  linearly with an engine's batch, the crowded ones set the p90. So each engine carries its *group
  load*, the number of groups homed on it (a group whose recent requests went to several engines counts
  for each in proportion), and ``placement(e) = place_weight x reuse x mean TTFT x (load(e) - mean) /
  mean x miss(e) / prompt``: scaled by the fraction of ``r`` that ``e`` misses (an engine that holds the
  group is not moving it), and by ``reuse``, the recent mean of the best cached fraction of each request
  (near 1 when groups recur, 0 when prompts are unique and placing them decides nothing for later).
  Groups weigh the same whatever their rate: a minute of one group's requests is too noisy an estimate
  of its rate (with rate-weighted loads W1 at 50 QPS gets p90 74 ms, with counts 71 ms).

A request's group is its first prompt node (a system prompt), unless that node carries more than
``1 / engines`` of the recent traffic: one engine could not serve it, so the group is the next node
down (W5: the system prompt shared by every user is too hot, each user's history is a group), down to
``group_depth`` nodes.

What :class:`~igw_sim.replay.routers.EngineView` lacks (the oracle works around both):

* ``pending_prefix_tokens(request) -> int``: the prefix of ``request`` that the cache holds *or* that
  requests already queued or running on the engine will have computed by the time it is scheduled (in
  ``FastEngine``: the longest prefix of ``request.nodes`` whose nodes are cached or held by a waiting or
  running ``_Req``; in ``ExactEngine``: the same over the scheduler's requests). The oracle keeps it itself
  from what it sent and what finished, which is exact only because it is the only router.
* ``step_s(prefill_tokens, decode_seqs, context_tokens) -> float`` (the profile's ``step_ms`` / 1000)
  plus ``context_tokens`` and ``decode_seqs`` of the current batch: with them the cost could price the
  decode load a request adds to every step of its engine for its whole life. Tried with the h100
  constants (``ms_per_decode_seq``, ``ms_per_kv_ktoken``) hard-coded: no gain on W1, W4 or W7, so it is
  not in the cost.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from igw_sim.replay.requests import SimRequest

if TYPE_CHECKING:  # routers.py imports this module to register it: no import cycle at run time
    from igw_sim.replay.routers import EngineView

__all__ = ["OracleRouter"]


class OracleRouter:
    """Smallest ``predicted TTFT + miss cost + placement cost``, from live views (module docstring)."""

    name = "oracle"
    true_state = True
    needs_completions = True
    reads_metrics = True

    def __init__(
        self,
        seed: int = 0,
        *,
        miss_weight: float = 16.0,
        place_weight: float = 30.0,
        tau_s: float = 60.0,
        reuse_requests: float = 200.0,
        group_depth: int = 3,
    ) -> None:
        """``miss_weight``: price of a missed prompt token, in prefill times. ``place_weight``: price of
        a group load ``x`` above the mean, in mean TTFTs times ``x / mean``. ``tau_s``: time constant of
        the decayed counts (traffic shares of nodes, where a group's requests went). ``reuse_requests``:
        requests averaged by ``reuse``. ``group_depth``: deepest prompt node that can be a group."""
        if group_depth < 1:
            raise ValueError("group_depth must be >= 1")
        if not tau_s > 0 or not reuse_requests >= 1:
            raise ValueError("tau_s must be > 0 and reuse_requests >= 1")
        self.rng = random.Random(seed)
        self.miss_weight = miss_weight
        self.place_weight = place_weight
        self.tau = tau_s
        self.reuse_alpha = 1.0 / reuse_requests
        self.group_depth = group_depth
        self.reuse = 0.0
        """Recent mean of the best cached (or pending) fraction of each request's prompt."""
        # Per engine: nodes of the requests sent there and not finished (node -> how many hold it), and
        # the group load.
        self.held: list[dict[int, int]] = []
        self.group_load: list[float] = []
        # Decayed counts are stored scaled by exp((t - t0) / tau): adding ``grow`` now counts 1, and
        # nothing is touched as time passes (rescaled when the factor gets large).
        self._t0 = 0.0
        self._grow = 1.0
        self._total = 0.0
        self._next_prune = 0.0
        self.node_count: dict[int, float] = {}
        """Requests per node of the first ``group_depth`` levels (decayed)."""
        self.group_count: dict[int, float] = {}
        """Requests per group (decayed)."""
        self.group_engines: dict[int, dict[int, float]] = {}
        """Requests per group and engine (decayed); ``group_load[e]`` sums their fractions."""

    # -- the Router protocol -------------------------------------------------------------------

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        n = len(engines)
        if not self.held:
            self.held = [{} for _ in range(n)]
            self.group_load = [0.0] * n
        self._clock(engines[0].now)
        prompt = request.prompt_tokens
        ttfts: list[float] = []
        misses: list[int] = []
        for v in engines:
            ttft = v.predicted_ttft(request)
            cached = v.cached_prefix_tokens(request)
            if ttft is None or cached is None:
                raise ValueError("the oracle needs live engine views")
            ttfts.append(ttft)
            misses.append(prompt - max(cached, self._pending(request, v)))
        self.reuse += self.reuse_alpha * ((prompt - min(misses)) / prompt - self.reuse)
        load = self.group_load
        mean_load = sum(load) / n
        mean_ttft = sum(ttfts) / n
        place = self.place_weight * self.reuse * mean_ttft / mean_load / prompt if mean_load > 0 else 0.0
        costs = [
            ttfts[i]
            + self.miss_weight * engines[i].prefill_s_per_token * misses[i]
            + place * (load[i] - mean_load) * misses[i]
            for i in range(n)
        ]
        best = min(costs)
        ties = [i for i, c in enumerate(costs) if c == best]
        choice = ties[0] if len(ties) == 1 else ties[self.rng.randrange(len(ties))]
        self._record(request, choice, n)
        return choice

    def on_complete(self, request: SimRequest, engine: int) -> None:
        held = self.held[engine]
        for node in request.nodes:
            left = held[node] - 1
            if left:
                held[node] = left
            else:
                del held[node]

    # -- internals -------------------------------------------------------------------------------

    def _pending(self, request: SimRequest, view: EngineView) -> int:
        """Prompt tokens of ``request`` that requests sent to ``view`` and not finished share with it
        (whole blocks, capped at ``prompt - 1`` like a hit)."""
        held = self.held[view.index]
        ends = request.ends
        tokens = 0
        for j, node in enumerate(request.nodes[:-1]):
            if node not in held:
                break
            tokens = ends[j]
        bs = view.block_size
        return min(tokens, request.prompt_tokens - 1) // bs * bs

    def _group(self, request: SimRequest, n: int) -> int:
        """The request's group: its first prompt node that carries at most ``1 / n`` of the traffic."""
        nodes = request.nodes
        last = min(self.group_depth, len(nodes) - 1) - 1
        group = nodes[0]
        for i in range(last + 1):
            group = nodes[i]
            if self.node_count.get(group, 0.0) * n <= self._total:
                break
        return group

    def _record(self, request: SimRequest, engine: int, n: int) -> None:
        held = self.held[engine]
        for node in request.nodes:
            held[node] = held.get(node, 0) + 1
        group = self._group(request, n)
        w = self._grow
        self._total += w
        nodes = request.nodes
        counts = self.node_count
        for i in range(min(self.group_depth, len(nodes) - 1)):
            counts[nodes[i]] = counts.get(nodes[i], 0.0) + w
        load = self.group_load
        per = self.group_engines.setdefault(group, {})
        old = self.group_count.get(group, 0.0)
        if old > 0:
            for e, c in per.items():
                load[e] -= c / old
        new = old + w
        self.group_count[group] = new
        per[engine] = per.get(engine, 0.0) + w
        for e, c in per.items():
            load[e] += c / new

    def _clock(self, now: float) -> None:
        """Bring the decay factor to ``now``; every ``tau`` drop the groups and nodes that faded out."""
        x = (now - self._t0) / self.tau
        if x > 30.0:
            f = math.exp(-x)
            self._total *= f
            for d in (self.node_count, self.group_count):
                for k in d:
                    d[k] *= f
            for per in self.group_engines.values():
                for k in per:
                    per[k] *= f
            self._t0 = now
            x = 0.0
        self._grow = math.exp(x)
        if now >= self._next_prune:
            self._next_prune = now + self.tau
            floor = 0.05 * self._grow
            self.node_count = {k: v for k, v in self.node_count.items() if v >= floor}
            for group in [g for g, v in self.group_count.items() if v < floor]:
                c = self.group_count.pop(group)
                for e, ce in self.group_engines.pop(group).items():
                    self.group_load[e] -= ce / c
