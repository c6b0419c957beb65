"""The requests of a replay: plain data shared by workloads, routers and virtual-time engines.

A prompt is a sequence of *segments* ``(key, length)``: a key names one fixed token sequence (a system
prompt, a question, an earlier answer), so two prompts whose segments agree up to some point share
exactly those tokens. This is what makes a million-request replay cheap: nobody materialises or hashes
tokens, yet prefix sharing is as precise as with token ids.

Each segment, in its position, is a *node* of a content trie, identified by a 64-bit hash of its key, its
length and its parent node, starting from a root that depends only on the LoRA adapter (vLLM puts the adapter name into every block
hash, so adapters never share cache). Two requests share node ``n`` only if every segment before it
agrees too, like vLLM's chained block hashes. A request's last node is its *output* (the tokens it will
generate), keyed by ``output_key``: a later request that quotes the answer (a chat's next turn) names the
same key in its segments and reaches the same node.

Blocks (and router chunks) belong to nodes: block ``j`` (tokens ``[j*bs, (j+1)*bs)``) belongs to the node
that holds its *last* token, since its hash depends on every token up to there. Node ``i`` of a request
owns blocks ``ends[i-1] // bs`` to ``ends[i] // bs - 1`` (see :func:`owned_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import xxhash

__all__ = ["Segment", "SimRequest", "chunk_runs", "node_id", "owned_blocks", "prefix_nodes"]

Segment = tuple[str, int]
"""``(key, length in tokens)``: one named run of prompt tokens."""


_MASK: Final = (1 << 64) - 1
# Compiled, a Final module attribute is a C static: no lookup of ``xxhash`` and its attribute per call.
_xxh3_64_intdigest: Final = xxhash.xxh3_64_intdigest


def node_id(parent: int, key: str, length: int) -> int:
    """The trie node of segment ``(key, length)`` after node ``parent`` (a 64-bit int, stable across runs).

    A key names one token sequence of one length: the same key with another length is another node.
    """
    return int(_xxh3_64_intdigest(key, (parent ^ (length * 0x9E3779B97F4A7C15)) & _MASK))


def _root(lora: str | None) -> int:
    return 0 if lora is None else node_id(0, "\x00lora:" + lora, 0)


def prefix_nodes(segments: Sequence[Segment], lora: str | None = None) -> tuple[int, ...]:
    """The trie nodes of a prompt's first segments (pass them to :class:`SimRequest` as ``prefix_nodes``)."""
    nodes: list[int] = []
    parent = _root(lora)
    for key, length in segments:
        parent = node_id(parent, key, length)
        nodes.append(parent)
    return tuple(nodes)


class SimRequest:
    """One request of a workload (plain data: routers read it, engines never change it).

    ``prefix_nodes``, when given, are the trie nodes of the first ``len(prefix_nodes)`` segments, as
    :func:`prefix_nodes` computes them once for a prefix shared by many requests (a generator's system
    prompt): they are trusted, not recomputed. Without it every node is hashed here.
    """

    __slots__ = ("arrival", "ends", "lora", "nodes", "output_key", "output_tokens", "prompt_tokens", "request_id",
                 "segments")  # fmt: skip

    request_id: int
    """Unique within a replay (the workload's order)."""
    arrival: float
    """Arrival time in simulated seconds from the start of the replay."""
    segments: tuple[Segment, ...]
    """The prompt, as named runs of tokens."""
    output_tokens: int
    """Tokens to generate (there is no EOS: every request generates exactly this many)."""
    lora: str | None
    """LoRA adapter name, or ``None`` for the base model."""
    output_key: str | None
    """Key under which a later prompt can quote this request's answer (``None``: nobody will)."""
    prompt_tokens: int
    nodes: tuple[int, ...]
    """Trie node of every segment, then of the output."""
    ends: tuple[int, ...]
    """Cumulative end token of every node (the last one is ``prompt_tokens + output_tokens``)."""

    def __init__(
        self,
        request_id: int,
        arrival: float,
        segments: tuple[Segment, ...],
        output_tokens: int,
        lora: str | None = None,
        output_key: str | None = None,
        *,
        prefix_nodes: tuple[int, ...] = (),
    ) -> None:
        self.request_id = request_id
        self.arrival = arrival
        self.segments = segments
        self.output_tokens = output_tokens
        self.lora = lora
        self.output_key = output_key
        if output_tokens < 1:
            raise ValueError("output_tokens must be >= 1")
        if len(prefix_nodes) > len(segments):
            raise ValueError("more prefix nodes than segments")
        nodes: list[int] = list(prefix_nodes)
        ends: list[int] = []
        parent = nodes[-1] if nodes else _root(lora)
        end = 0
        known = len(nodes)
        for i, (key, length) in enumerate(segments):
            if length < 1:
                raise ValueError(f"segment {key!r} must have a length >= 1")
            end += length
            ends.append(end)
            if i >= known:
                parent = node_id(parent, key, length)
                nodes.append(parent)
        if not nodes:
            raise ValueError("a prompt needs at least one segment")
        out_key = output_key if output_key is not None else f"\x00out:{request_id}"
        nodes.append(node_id(parent, out_key, output_tokens))
        ends.append(end + output_tokens)
        self.prompt_tokens = end
        self.nodes = tuple(nodes)
        self.ends = tuple(ends)

    def __repr__(self) -> str:
        return (
            f"SimRequest(request_id={self.request_id!r}, arrival={self.arrival!r}, segments={self.segments!r}, "
            f"output_tokens={self.output_tokens!r}, lora={self.lora!r}, output_key={self.output_key!r})"
        )

    @property
    def prompt_nodes(self) -> tuple[int, ...]:
        return self.nodes[:-1]


def owned_blocks(ends: Sequence[int], index: int, block_size: int) -> tuple[int, int]:
    """Block range ``[first, stop)`` that node ``index`` owns (possibly empty)."""
    start = ends[index - 1] if index > 0 else 0
    return start // block_size, ends[index] // block_size


def chunk_runs(request: SimRequest, chunk_tokens: int, *, partial: bool, max_chunks: int = 0) -> list[tuple[int, int]]:
    """The prompt cut into chunks of ``chunk_tokens``, as runs ``(node, chunks of that node)``.

    A router that hashes fixed-size chunks of the prompt (the EPP's approximate prefix index) sees chunk
    ``c`` as the content up to its end, which is what node ``(node, c)`` identifies. ``partial`` also
    counts a trailing partial chunk (the EPP hashes it; vLLM never caches a partial block). ``max_chunks``
    (> 0) keeps only that many chunks from the start.
    """
    runs: list[tuple[int, int]] = []
    ends = request.ends
    prompt = request.prompt_tokens
    total = -(-prompt // chunk_tokens) if partial else prompt // chunk_tokens
    if max_chunks > 0:
        total = min(total, max_chunks)
    first = 0
    for i, node in enumerate(request.nodes[:-1]):
        end = ends[i]
        stop = end // chunk_tokens
        if partial and end == prompt and end % chunk_tokens:
            stop += 1
        stop = min(stop, total)
        if stop > first:
            runs.append((node, stop - first))
            first = stop
        if first >= total:
            break
    return runs
