"""KV-cache events (vLLM's ``vllm/distributed/kv_events.py``) and their msgpack wire encoding.

The cache (:mod:`igw_sim.kvcache`) emits :class:`BlockStored`, :class:`BlockRemoved` and
:class:`AllBlocksCleared` with raw hash bytes; :func:`encode_batch` turns one engine step's events into
the payload of one ZMQ message:

* the batch is always an array ``[ts, [event, ...], data_parallel_rank]``;
* an event is either *array-like* (``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind]``, trailing fields
  equal to their default left out, as msgspec's ``array_like`` + ``omit_defaults`` does) or a *map* with
  a ``"type"`` tag and the same field names, fields equal to their default left out (vLLM 0.32's
  encoding);
* block hashes are ints (the last 8 bytes, big-endian; vLLM's default) or the raw bytes.

``BlockRemoved`` carries ``block_hashes, medium, group_idx``; ``AllBlocksCleared`` carries nothing. The
transport (three frames: topic, 8-byte big-endian sequence number, payload) is in
:mod:`igw_sim.kvpublisher`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from igw_sim.hashing import ExtraKeys, to_int

__all__ = [
    "MEDIUM_GPU",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventFormat",
    "KVEvent",
    "encode_batch",
    "event_fields",
]

MEDIUM_GPU = "GPU"
KV_CACHE_SPEC_KIND = "full_attention"

EventFormat = Literal["map", "array"]

_REQUIRED = object()  # marks a field without a default: always encoded


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks newly registered in the prefix cache, in chain order."""

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    extra_keys: tuple[ExtraKeys, ...]
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks evicted (reused for other tokens)."""

    block_hashes: tuple[bytes, ...]
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def _hash(value: bytes, int_hashes: bool) -> int | bytes:
    return to_int(value) if int_hashes else value


def event_fields(event: KVEvent, *, int_hashes: bool = True) -> tuple[str, list[tuple[str, Any, Any]]]:
    """``(tag, [(field name, value, default), ...])`` in vLLM's declaration order."""
    if isinstance(event, BlockStored):
        parent = None if event.parent_block_hash is None else _hash(event.parent_block_hash, int_hashes)
        return "BlockStored", [
            ("block_hashes", [_hash(h, int_hashes) for h in event.block_hashes], _REQUIRED),
            ("parent_block_hash", parent, _REQUIRED),
            ("token_ids", list(event.token_ids), _REQUIRED),
            ("block_size", event.block_size, _REQUIRED),
            ("lora_id", event.lora_id, _REQUIRED),
            ("medium", event.medium, _REQUIRED),
            ("lora_name", event.lora_name, _REQUIRED),
            ("extra_keys", [None if k is None else list(k) for k in event.extra_keys], None),
            ("group_idx", 0, None),
            ("kv_cache_spec_kind", KV_CACHE_SPEC_KIND, None),
        ]
    if isinstance(event, BlockRemoved):
        return "BlockRemoved", [
            ("block_hashes", [_hash(h, int_hashes) for h in event.block_hashes], _REQUIRED),
            ("medium", event.medium, _REQUIRED),
            ("group_idx", 0, None),
        ]
    return "AllBlocksCleared", []


def _encode_event(event: KVEvent, fmt: EventFormat, int_hashes: bool) -> object:
    tag, fields = event_fields(event, int_hashes=int_hashes)
    if fmt == "map":
        out: dict[str, object] = {"type": tag}
        out.update((name, value) for name, value, default in fields if default is _REQUIRED or value != default)
        return out
    values = [tag, *(value for _, value, _ in fields)]
    defaults = [_REQUIRED, *(default for _, _, default in fields)]
    while len(values) > 1 and defaults[-1] is not _REQUIRED and values[-1] == defaults[-1]:
        values.pop()
        defaults.pop()
    return values


def encode_batch(
    ts: float,
    events: list[KVEvent],
    *,
    fmt: EventFormat = "map",
    int_hashes: bool = True,
    data_parallel_rank: int = 0,
) -> bytes:
    """The msgpack payload of one ``EventBatch``."""
    body = [ts, [_encode_event(e, fmt, int_hashes) for e in events], data_parallel_rank]
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed
