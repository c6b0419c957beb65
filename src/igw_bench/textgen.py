"""Workloads as HTTP requests: the simulator's workload generators rendered into prompt text.

The benchmark set (``reference/scheduling-anchors.md`` section 6) is defined once, in
:mod:`igw_sim.replay.workloads`, as requests made of named token runs (*segments*). Here each segment
becomes text: ``n`` words drawn from a generator seeded by the segment's key, each word one token for
the simulator's tokenizer (a word with its leading space), so two prompts share exactly the tokens
their segments share and the virtual-time replay and the HTTP benchmark see the same traffic.

Generators number their per-request segments from 0 in every run, so a ladder of steps would repeat
the first step's unique questions; :data:`PER_STEP_KEYS` names those segments, and a step's ``tag`` makes
them new in each step (W1's questions recur on purpose and are shared across steps, like its system
prompts; W5's users start afresh each step).

A segment that quotes an earlier request's answer (``output_key``, multi-turn chat) cannot be written
in advance: it is a :class:`Quote`, filled in by the load client with the text that request actually
received.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

from igw_sim.replay.requests import SimRequest
from igw_sim.tokenizer import GENERATION_WORDS

__all__ = ["PER_STEP_KEYS", "HttpRequest", "Quote", "render_workload", "segment_text"]

PER_STEP_KEYS = re.compile(r"^(w4/q|w5/[hqa]|w6/q|w7/p)")
"""Segment keys that are unique per request (or per user) in :mod:`igw_sim.replay.workloads`."""


@dataclass(frozen=True, slots=True)
class Quote:
    """The answer of the request whose ``output_key`` is ``key``, quoted in a later prompt."""

    key: str


@dataclass(slots=True)
class HttpRequest:
    """One request of a rendered workload: when to send it (simulated seconds) and what."""

    index: int
    at: float
    """Arrival, simulated seconds from the start of the step."""
    parts: tuple[str | Quote, ...]
    """The prompt: text, and answers to quote (joined by the client)."""
    max_tokens: int
    model: str
    output_key: str | None
    """Later prompts quote this request's answer under this key (the client keeps the text)."""
    prompt_tokens: int
    """Prompt length in tokens, as the workload defines it."""

    def body(self, answers: dict[str, str]) -> dict[str, object]:
        """The ``/v1/completions`` body (streamed, usage reported, exactly ``max_tokens`` generated)."""
        prompt = "".join(p if isinstance(p, str) else answers.get(p.key, "") for p in self.parts)
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


class _Texts:
    """Segment texts, memoised: shared prefixes are rendered once per run."""

    def __init__(self, limit: int = 4096) -> None:
        self._cache: dict[tuple[str, int], str] = {}
        self._limit = limit

    def get(self, key: str, length: int) -> str:
        found = self._cache.get((key, length))
        if found is None:
            found = segment_text(key, length)
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[(key, length)] = found
        return found


def segment_text(key: str, length: int) -> str:
    """``length`` words (one token each), the same for the same key in every process."""
    rng = random.Random(xxhash.xxh64_intdigest(key))
    words = GENERATION_WORDS
    return "".join(" " + words[i] for i in rng.choices(range(len(words)), k=length))


def render_workload(requests: Iterable[SimRequest], model: str, *, tag: str = "") -> list[HttpRequest]:
    """Render ``requests`` (arrival order) for ``model``; a request's LoRA adapter is its model name.

    A segment whose key is the ``output_key`` of an earlier request becomes a :class:`Quote`; the keys of
    :data:`PER_STEP_KEYS` are prefixed with ``tag``.
    """
    texts = _Texts()
    known: set[str] = set()
    out: list[HttpRequest] = []
    for i, request in enumerate(requests):
        parts: list[str | Quote] = []
        for key, length in request.segments:
            if key in known:
                parts.append(Quote(key))
            else:
                parts.append(texts.get(f"{tag}/{key}" if tag and PER_STEP_KEYS.match(key) else key, length))
        if request.output_key is not None:
            known.add(request.output_key)
        out.append(
            HttpRequest(
                index=i,
                at=request.arrival,
                parts=tuple(parts),
                max_tokens=request.output_tokens,
                model=request.lora or model,
                output_key=request.output_key,
                prompt_tokens=request.prompt_tokens,
            )
        )
    return out
