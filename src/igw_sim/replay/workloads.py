"""Workloads for replays: seeded generators of the benchmark set, and JSONL files.

A workload is an iterable of :class:`~igw_sim.replay.requests.SimRequest` in arrival order; iterating it
again gives the same requests, so every policy of a comparison sees the same traffic. Generators are
named by a spec ``name:key=value,...`` (``reference/scheduling-anchors.md`` section 6); arrivals are
Poisson at ``qps`` for ``duration`` seconds (or until ``requests`` requests), all drawn from ``seed``.

``w1`` shared long prefixes (llm-d "73-capacity")
    ``groups`` system prompts of ``system`` tokens, each with ``prompts`` questions of ``question``
    tokens; a request picks a group and one of its questions at random (so whole prompts recur, as with
    inference-perf's ``shared_prefix``) and generates ``output`` tokens. Instead of ``groups``, ``fill``
    sizes the working set, ``groups x (system + prompts x question)``, to that fraction of the cluster's
    KV cache. Defaults: fill 0.73, prompts 5, system 6000, question 1200, output 250.
``w4`` many small groups (SGLang ``generated-shared-prefix``)
    ``groups`` 64 system prompts of ``system`` 2048 tokens; every request a new question of ``question``
    128 tokens; output 256.
``w5`` multi-turn chat (production-stack ``multi-round-qa``)
    ``users`` 64, each with a private ``history`` (2000 tokens) after a ``system`` prompt (1000) shared by
    all; arrival ``i`` is user ``i % users``'s next turn, whose prompt is the history, then every earlier
    question (``question`` 100) and answer (``answer`` 100), then a new question. Stops after ``rounds``
    (10) turns per user. The answer is quoted by the next turn exactly (``output_key``).
``w6`` multi-LoRA (S-LoRA / vLLM multi-LoRA benchmarks)
    ``adapters`` 16 LoRA adapters with Zipf popularity (adapter ``k`` drawn with weight
    ``1 / (k + 1) ** zipf``, ``zipf`` 1.0); each adapter has its own ``system`` prompt (1024 tokens, cached
    per adapter, since the adapter is part of every block hash), then a new ``question`` (256) and
    ``output`` 128 tokens. Run it with ``--max-loras`` below ``adapters`` to see slot thrashing.
``w7`` mixed long and short, no sharing
    A ``long_fraction`` (0.5) of ``long_prompt`` 8192 / ``long_output`` 64 requests, the rest
    ``short_prompt`` 128 / ``short_output`` 512; every prompt unique.

JSONL, one request a line, in arrival order: ``{"t": seconds, "output_tokens": n}`` plus the prompt as
``"segments": [[key, tokens], ...]``, or ``"prefix_group": key, "prefix_tokens": n, "prompt_tokens": m``
(a shared prefix and a unique suffix of ``m``), or ``"prompt_tokens": m`` alone (unique); optionally
``"lora"`` and ``"output_key"``. :func:`save_jsonl` writes the ``segments`` form.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igw_sim.replay.requests import Segment, SimRequest, prefix_nodes

__all__ = ["GENERATORS", "Workload", "build_workload", "load_jsonl", "parse_spec", "save_jsonl"]


@dataclass(frozen=True, slots=True)
class Workload:
    """A re-iterable workload and a one-line description of it."""

    description: str
    factory: Callable[[], Iterator[SimRequest]]

    def __iter__(self) -> Iterator[SimRequest]:
        return self.factory()


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"w1:qps=20,fill=0.73"`` -> ``("w1", {"qps": 20.0, "fill": 0.73})``."""
    name, _, rest = spec.partition(":")
    params: dict[str, float] = {}
    for item in rest.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"workload parameter {item!r} is not key=value")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"workload parameter {key.strip()!r} must be a number, got {value!r}") from None
    return name.strip().lower(), params


class _Params:
    """Typed access to spec parameters; unknown keys are an error."""

    def __init__(self, name: str, params: dict[str, float], defaults: dict[str, float]) -> None:
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {name} parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(defaults))})")
        self.values = {**defaults, **params}

    def f(self, key: str) -> float:
        return self.values[key]

    def i(self, key: str) -> int:
        value = int(self.values[key])
        if value < 0:
            raise ValueError(f"{key} must be >= 0")
        return value


_ARRIVALS = {"qps": 10.0, "duration": 60.0, "requests": 0.0, "seed": 0.0}


class _Arrivals:
    """Poisson arrivals at ``qps`` for ``duration`` seconds (or ``requests`` of them), and the seeded rng
    that then draws each request's contents.

    The draws are exactly ``rng.expovariate(qps)`` and ``rng.randrange(n)`` (the same floats and ints,
    in the same order), without their Python-level frames: compiled, this loop is a large part of a
    replay's cost per request.
    """

    def __init__(self, p: _Params) -> None:
        qps = p.f("qps")
        if not qps > 0:
            raise ValueError("qps must be > 0")
        self.qps = qps
        self.duration = p.f("duration")
        self.cap = p.i("requests")
        self.rng = random.Random(p.i("seed"))
        self.random: Callable[[], float] = self.rng.random
        self.getrandbits: Callable[[int], int] = self.rng.getrandbits
        self.n = -1
        """Index of the current arrival."""
        self.t = 0.0
        """Time of the current arrival."""

    def next(self) -> bool:
        """Move to the next arrival (``n``, ``t``); ``False`` when there is none."""
        n = self.n + 1
        cap = self.cap
        if cap and n >= cap:
            return False
        t = self.t + -math.log(1.0 - self.random()) / self.qps  # Random.expovariate, as it computes it
        if cap == 0 and t > self.duration:
            return False
        self.n = n
        self.t = t
        return True

    def below(self, n: int) -> int:
        """``rng.randrange(n)``, drawn as ``Random._randbelow`` draws it (rejection on ``getrandbits``)."""
        if n <= 0:
            raise ValueError("empty range for randrange()")
        getrandbits = self.getrandbits
        k = n.bit_length()
        r = getrandbits(k)
        while r >= n:
            r = getrandbits(k)
        return r


def _w1(params: dict[str, float], cluster_kv_tokens: int | None) -> Workload:
    p = _Params("w1", params, {**_ARRIVALS, "groups": 0, "fill": 0.73, "prompts": 5, "system": 6000,
                               "question": 1200, "output": 250})  # fmt: skip
    prompts, system, question, output = p.i("prompts"), p.i("system"), p.i("question"), p.i("output")
    groups = p.i("groups")
    if groups == 0:
        if cluster_kv_tokens is None:
            raise ValueError("w1 needs groups=N, or fill=F and a known cluster KV size")
        groups = max(round(p.f("fill") * cluster_kv_tokens / (system + prompts * question)), 1)
    resident = groups * (system + prompts * question)
    fill = f", {resident / cluster_kv_tokens:.0%} of the cluster KV" if cluster_kv_tokens else ""

    def gen() -> Iterator[SimRequest]:
        # Each whole prompt recurs: its segments and nodes are built once (the same values as built anew).
        made: dict[int, tuple[tuple[Segment, ...], tuple[int, ...]]] = {}
        arrivals = _Arrivals(p)
        while arrivals.next():
            g = arrivals.below(groups)
            q = arrivals.below(prompts)
            k = g * prompts + q
            known = made.get(k)
            if known is None:
                segments = ((f"w1/s{g}", system), (f"w1/q{g}.{q}", question))
                known = made[k] = (segments, prefix_nodes(segments))
            yield SimRequest(arrivals.n, arrivals.t, known[0], output, prefix_nodes=known[1])

    return Workload(
        f"w1: {groups} groups x {prompts} prompts, system {system}, question {question}, output {output}; "
        f"working set {resident:,} tokens{fill}; Poisson {p.f('qps'):g} QPS",
        gen,
    )


def _w4(params: dict[str, float], cluster_kv_tokens: int | None) -> Workload:
    p = _Params("w4", params, {**_ARRIVALS, "groups": 64, "system": 2048, "question": 128, "output": 256})
    groups, system, question, output = p.i("groups"), p.i("system"), p.i("question"), p.i("output")

    def gen() -> Iterator[SimRequest]:
        # The system prompts' segments and nodes are built once (the same values as built anew).
        shared = [(f"w4/s{g}", system) for g in range(groups)]
        nodes = [prefix_nodes((seg,)) for seg in shared]
        arrivals = _Arrivals(p)
        while arrivals.next():
            n = arrivals.n
            g = arrivals.below(groups)
            yield SimRequest(n, arrivals.t, (shared[g], (f"w4/q{n}", question)), output, prefix_nodes=nodes[g])

    return Workload(
        f"w4: {groups} groups, system {system}, unique question {question}, output {output}; "
        f"Poisson {p.f('qps'):g} QPS",
        gen,
    )


def _w5(params: dict[str, float], cluster_kv_tokens: int | None) -> Workload:
    p = _Params("w5", params, {**_ARRIVALS, "users": 64, "rounds": 10, "system": 1000, "history": 2000,
                               "question": 100, "answer": 100})  # fmt: skip
    users, rounds = max(p.i("users"), 1), p.i("rounds")
    system, history, question, answer = p.i("system"), p.i("history"), p.i("question"), p.i("answer")

    def gen() -> Iterator[SimRequest]:
        arrivals = _Arrivals(p)
        while arrivals.next():
            n, t = arrivals.n, arrivals.t
            user, turn = n % users, n // users
            if turn >= rounds:
                return
            segments: list[tuple[str, int]] = [("w5/sys", system), (f"w5/h{user}", history)]
            for k in range(turn):
                segments += [(f"w5/q{user}.{k}", question), (f"w5/a{user}.{k}", answer)]
            segments.append((f"w5/q{user}.{turn}", question))
            yield SimRequest(n, t, tuple(segments), answer, output_key=f"w5/a{user}.{turn}")

    return Workload(
        f"w5: {users} users x {rounds} turns, system {system}, history {history}, question {question}, "
        f"answer {answer}; Poisson {p.f('qps'):g} QPS",
        gen,
    )


def _w6(params: dict[str, float], cluster_kv_tokens: int | None) -> Workload:
    p = _Params("w6", params, {**_ARRIVALS, "adapters": 16, "zipf": 1.0, "system": 1024, "question": 256,
                               "output": 128})  # fmt: skip
    adapters, system, question, output = max(p.i("adapters"), 1), p.i("system"), p.i("question"), p.i("output")
    zipf = p.f("zipf")
    cum: list[float] = []
    total = 0.0
    for k in range(adapters):
        total += 1.0 / (k + 1) ** zipf
        cum.append(total)

    def gen() -> Iterator[SimRequest]:
        # Each adapter's name, system prompt segment and node are built once (the same values as built anew).
        names = [f"lora-{a}" for a in range(adapters)]
        shared = [(f"w6/s{a}", system) for a in range(adapters)]
        nodes = [prefix_nodes((shared[a],), names[a]) for a in range(adapters)]
        arrivals = _Arrivals(p)
        while arrivals.next():
            n, t = arrivals.n, arrivals.t
            a = min(bisect.bisect_left(cum, arrivals.random() * total), adapters - 1)
            yield SimRequest(n, t, (shared[a], (f"w6/q{n}", question)), output, lora=names[a], prefix_nodes=nodes[a])

    return Workload(
        f"w6: {adapters} LoRA adapters (Zipf {zipf:g}), system {system} per adapter, unique question {question}, "
        f"output {output}; Poisson {p.f('qps'):g} QPS",
        gen,
    )


def _w7(params: dict[str, float], cluster_kv_tokens: int | None) -> Workload:
    p = _Params("w7", params, {**_ARRIVALS, "long_fraction": 0.5, "long_prompt": 8192, "long_output": 64,
                               "short_prompt": 128, "short_output": 512})  # fmt: skip
    frac = p.f("long_fraction")
    long_p, long_o, short_p, short_o = p.i("long_prompt"), p.i("long_output"), p.i("short_prompt"), p.i("short_output")

    def gen() -> Iterator[SimRequest]:
        arrivals = _Arrivals(p)
        while arrivals.next():
            n, t = arrivals.n, arrivals.t
            if arrivals.random() < frac:
                yield SimRequest(n, t, ((f"w7/p{n}", long_p),), long_o)
            else:
                yield SimRequest(n, t, ((f"w7/p{n}", short_p),), short_o)

    return Workload(
        f"w7: {frac:.0%} {long_p}/{long_o}, rest {short_p}/{short_o} (prompt/output), no sharing; "
        f"Poisson {p.f('qps'):g} QPS",
        gen,
    )


GENERATORS: dict[str, Callable[[dict[str, float], int | None], Workload]] = {
    "w1": _w1,
    "w4": _w4,
    "w5": _w5,
    "w6": _w6,
    "w7": _w7,
}
"""Workload generators by name: ``factory(params, cluster_kv_tokens)``."""


def build_workload(spec: str, *, cluster_kv_tokens: int | None = None) -> Workload:
    """A generator spec (``w1:qps=20``) or the path of a JSONL file."""
    name, params = parse_spec(spec)
    if name in GENERATORS:
        return GENERATORS[name](params, cluster_kv_tokens)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise ValueError(f"workload file {spec} does not exist")
        return Workload(f"{path.name} (JSONL)", lambda: load_jsonl(path))
    raise ValueError(f"unknown workload {spec!r} (choose from {', '.join(GENERATORS)}, or a .jsonl file)")


def _from_record(n: int, rec: dict[str, Any]) -> SimRequest:
    try:
        t = float(rec["t"])
        output = int(rec.get("output_tokens", rec.get("max_tokens", 0)))
        if "segments" in rec:
            segments = tuple((str(key), int(length)) for key, length in rec["segments"])
        elif "prefix_group" in rec:
            segments = ((f"g/{rec['prefix_group']}", int(rec["prefix_tokens"])), (f"u/{n}", int(rec["prompt_tokens"])))
        else:
            segments = ((f"u/{n}", int(rec["prompt_tokens"])),)
        lora = rec.get("lora")
        key = rec.get("output_key")
        return SimRequest(
            n,
            t,
            segments,
            output,
            lora=None if lora is None else str(lora),
            output_key=None if key is None else str(key),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"line {n + 1}: bad request record ({exc})") from None


def load_jsonl(path: str | Path) -> Iterator[SimRequest]:
    """Stream the requests of a JSONL workload file."""
    with open(path, encoding="utf-8") as f:
        n = 0
        for line in f:
            if not line.strip():
                continue
            yield _from_record(n, json.loads(line))
            n += 1


def save_jsonl(requests: Iterable[SimRequest], path: str | Path) -> int:
    """Write requests as JSONL (``segments`` form); returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            rec: dict[str, Any] = {
                "t": r.arrival,
                "segments": [list(s) for s in r.segments],
                "output_tokens": r.output_tokens,
            }
            if r.lora is not None:
                rec["lora"] = r.lora
            if r.output_key is not None:
                rec["output_key"] = r.output_key
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            count += 1
    return count
