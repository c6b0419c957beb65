"""Decode vLLM's KV-cache event messages (``vllm/distributed/kv_events.py``), written from the wire format.

A message is three ZMQ frames::

    [topic (utf-8), seq (8 bytes, big-endian, unsigned), payload (msgpack EventBatch)]

and the payload is ``[ts, [event, ...], data_parallel_rank?]``. An event comes in one of two encodings,
both accepted:

* *array-like* (msgspec ``array_like`` + ``omit_defaults``): ``["BlockStored", block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys, group_idx,
  kv_cache_spec_kind, ...]``, ``["BlockRemoved", block_hashes, medium, group_idx, ...]``,
  ``["AllBlocksCleared"]``; trailing fields equal to their default may be missing, and fields newer
  than this decoder are ignored;
* a *map* with a ``"type"`` key and the same field names (vLLM 0.32).

Block hashes are ints (vLLM's default ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``: the low 64 bits of the
digest) or the raw digest bytes, which :func:`hash_to_int` turns into the same int (the last 8 bytes,
big-endian). An event with an unknown tag is skipped and counted (:attr:`EventBatch.skipped`), so a newer
engine's new event kinds do not break the stream; anything else that does not fit raises
:class:`KVEventDecodeError`, never another exception.

The topic convention (llm-d's) is ``kv@<host:port>@<model>``: :func:`parse_topic`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack

from igw.api.types import Endpoint

__all__ = [
    "MEDIUM_GPU",
    "SEQ_END",
    "TOPIC_PREFIX",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KVEvent",
    "KVEventDecodeError",
    "KVEventMessage",
    "decode_event",
    "decode_message",
    "decode_payload",
    "decode_seq",
    "hash_to_int",
    "parse_topic",
]

MEDIUM_GPU: Final = "GPU"
"""The medium of an event that names none (vLLM's default tier)."""
TOPIC_PREFIX: Final = "kv@"
SEQ_END: Final = 2**64 - 1
"""The replay end marker's sequence number (vLLM sends -1, two's complement; the same 8 bytes)."""

_U64: Final = 2**64 - 1

ExtraKeys = tuple[object, ...] | None
"""One block's extra keys as the event reports them: LoRA name, cache salt, multimodal identifiers."""


class KVEventDecodeError(ValueError):
    """A KV-event message, batch or event that does not follow the wire format."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks newly cached, in chain order: block ``i`` holds ``token_ids[i*block_size:(i+1)*block_size]``."""

    block_hashes: tuple[int, ...]
    parent: int | None
    """The engine hash of the block before the first one; ``None`` when the first block starts the sequence."""
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    medium: str = MEDIUM_GPU
    lora_id: int | None = None
    extra_keys: tuple[ExtraKeys, ...] = ()
    """Per block (possibly empty when the engine does not send them)."""
    group_idx: int = 0
    """The KV-cache group (hybrid models have several; plain models only group 0)."""


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Cached blocks evicted from ``medium``."""

    block_hashes: tuple[int, ...]
    medium: str = MEDIUM_GPU
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine's whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One engine step's events."""

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None
    skipped: int = 0
    """Events with a tag this decoder does not know (left out of ``events``)."""


@dataclass(frozen=True, slots=True)
class KVEventMessage:
    topic: str
    seq: int
    batch: EventBatch


# -- scalars ------------------------------------------------------------------------------------------


def hash_to_int(value: object) -> int:
    """An event's block hash as an unsigned 64-bit int: ints as they are (masked), bytes by their last 8 bytes."""
    if type(value) is int:  # not bool
        return value & _U64
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if not raw:
            raise KVEventDecodeError("empty block hash")
        return int.from_bytes(raw[-8:], "big")
    raise KVEventDecodeError(f"block hash must be an int or bytes, not {type(value).__name__}")


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise KVEventDecodeError(f"sequence frame has {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big")


def parse_topic(topic: str, *, prefix: str = TOPIC_PREFIX) -> tuple[str, str]:
    """``kv@<host:port>@<model>`` -> ``("host:port", "model")``; IPv6 hosts as ``[addr]:port``.

    The model is everything after the endpoint's ``@`` (it may be empty, or contain ``@``).
    """
    if not topic.startswith(prefix):
        raise KVEventDecodeError(f"topic {topic!r} does not start with {prefix!r}")
    endpoint, sep, model = topic[len(prefix) :].partition("@")
    if not sep:
        raise KVEventDecodeError(f"topic {topic!r} is not {prefix}<host:port>@<model>")
    try:
        Endpoint.parse_address(endpoint)
    except ValueError as exc:
        raise KVEventDecodeError(f"topic {topic!r}: {exc}") from None
    return endpoint, model


# -- events -------------------------------------------------------------------------------------------

_STORED_FIELDS: Final = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_FIELDS: Final = ("block_hashes", "medium", "group_idx")


def _fields(raw: Sequence[object] | Mapping[object, object], names: tuple[str, ...]) -> dict[str, object]:
    if isinstance(raw, Mapping):
        return {name: raw[name] for name in names if name in raw}
    return dict(zip(names, raw[1:], strict=False))  # length guard: missing trailing fields stay absent


def _hashes(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise KVEventDecodeError(f"{what}: block_hashes must be an array")
    return tuple(hash_to_int(h) for h in value)


def _int(value: object, what: str, *, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if type(value) is not int:
        raise KVEventDecodeError(f"{what} must be an int, not {type(value).__name__}")
    return value


def _opt_str(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KVEventDecodeError(f"{what} must be a string or null, not {type(value).__name__}")


def _medium(value: object) -> str:
    medium = _opt_str(value, "medium")
    return medium if medium else MEDIUM_GPU


def _frozen(value: object) -> object:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _extra_keys(value: object) -> tuple[ExtraKeys, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise KVEventDecodeError("BlockStored: extra_keys must be an array")
    out: list[ExtraKeys] = []
    for keys in value:
        if keys is None:
            out.append(None)
        elif isinstance(keys, list | tuple):
            out.append(tuple(_frozen(k) for k in keys))
        else:
            raise KVEventDecodeError("BlockStored: each block's extra_keys must be an array or null")
    return tuple(out)


def _stored(f: dict[str, object]) -> BlockStored:
    for name in ("block_hashes", "token_ids", "block_size"):
        if name not in f:
            raise KVEventDecodeError(f"BlockStored without {name}")
    tokens = f["token_ids"]
    if not isinstance(tokens, list | tuple) or not all(type(t) is int for t in tokens):
        raise KVEventDecodeError("BlockStored: token_ids must be an array of ints")
    block_size = _int(f["block_size"], "BlockStored block_size")
    if block_size <= 0:
        raise KVEventDecodeError(f"BlockStored: block_size {block_size} is not positive")
    parent = f.get("parent_block_hash")
    lora_id = f.get("lora_id")
    return BlockStored(
        block_hashes=_hashes(f["block_hashes"], "BlockStored"),
        parent=None if parent is None else hash_to_int(parent),
        token_ids=tuple(tokens),
        block_size=block_size,
        lora_name=_opt_str(f.get("lora_name"), "BlockStored lora_name"),
        medium=_medium(f.get("medium")),
        lora_id=None if lora_id is None else _int(lora_id, "BlockStored lora_id"),
        extra_keys=_extra_keys(f.get("extra_keys")),
        group_idx=_int(f.get("group_idx"), "BlockStored group_idx", default=0),
    )


def _removed(f: dict[str, object]) -> BlockRemoved:
    if "block_hashes" not in f:
        raise KVEventDecodeError("BlockRemoved without block_hashes")
    return BlockRemoved(
        block_hashes=_hashes(f["block_hashes"], "BlockRemoved"),
        medium=_medium(f.get("medium")),
        group_idx=_int(f.get("group_idx"), "BlockRemoved group_idx", default=0),
    )


def _cleared(_: dict[str, object]) -> AllBlocksCleared:
    return AllBlocksCleared()


_DECODERS: Final[dict[str, tuple[tuple[str, ...], Callable[[dict[str, object]], KVEvent]]]] = {
    "BlockStored": (_STORED_FIELDS, _stored),
    "BlockRemoved": (_REMOVED_FIELDS, _removed),
    "AllBlocksCleared": ((), _cleared),
}


def decode_event(raw: object) -> KVEvent | None:
    """One event, array- or map-encoded; ``None`` for a well-formed event of an unknown kind."""
    if isinstance(raw, Mapping):
        tag = raw.get("type")
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
    else:
        raise KVEventDecodeError(f"an event must be a non-empty array or a map, not {type(raw).__name__}")
    if not isinstance(tag, str):
        raise KVEventDecodeError(f"event tag must be a string, not {type(tag).__name__}")
    spec = _DECODERS.get(tag)
    if spec is None:
        return None
    names, build = spec
    return build(_fields(raw, names))


# -- batches and messages -----------------------------------------------------------------------------


def decode_payload(payload: bytes) -> EventBatch:
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types (ExtraData, FormatError, ValueError...)
        raise KVEventDecodeError(f"payload is not msgpack: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2:
        raise KVEventDecodeError("payload is not an EventBatch [ts, events, rank?]")
    ts, raw_events = batch[0], batch[1]
    if type(ts) not in (int, float):
        raise KVEventDecodeError(f"EventBatch ts must be a number, not {type(ts).__name__}")
    if not isinstance(raw_events, list):
        raise KVEventDecodeError("EventBatch events must be an array")
    rank = batch[2] if len(batch) > 2 else None
    if rank is not None and type(rank) is not int:
        raise KVEventDecodeError(f"EventBatch data_parallel_rank must be an int, not {type(rank).__name__}")
    events: list[KVEvent] = []
    skipped = 0
    try:
        for raw in raw_events:
            event = decode_event(raw)
            if event is None:
                skipped += 1
            else:
                events.append(event)
    except RecursionError:  # absurdly nested extra keys
        raise KVEventDecodeError("event nested too deeply") from None
    return EventBatch(ts=float(ts), events=tuple(events), data_parallel_rank=rank, skipped=skipped)


def decode_message(frames: Sequence[bytes]) -> KVEventMessage:
    """``[topic, seq, payload]`` -> :class:`KVEventMessage` (the topic is not parsed: :func:`parse_topic`)."""
    if len(frames) != 3:
        raise KVEventDecodeError(f"expected 3 frames, got {len(frames)}")
    topic, seq, payload = frames
    try:
        text = bytes(topic).decode("utf-8")
    except UnicodeDecodeError:
        raise KVEventDecodeError("topic is not utf-8") from None
    return KVEventMessage(topic=text, seq=decode_seq(bytes(seq)), batch=decode_payload(bytes(payload)))
