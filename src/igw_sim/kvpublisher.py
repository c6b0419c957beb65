"""Publish KV-cache events over ZMQ exactly as vLLM's ``ZmqEventPublisher`` does.

* One PUB socket per engine. Each engine step with events becomes one multipart message of three
  frames: ``[topic, seq, payload]``, where ``seq`` is an 8-byte big-endian counter starting at 0 and
  ``payload`` is the msgpack ``EventBatch`` of :func:`igw_sim.kvevents.encode_batch`.
* The endpoint decides who binds (vLLM's rule): an address containing ``*`` or ``::``, or an
  ``ipc://``/``inproc://`` one, is bound; any other (``tcp://127.0.0.1:5557``) is *connected to*, so one
  subscriber can bind once and receive from every engine, telling them apart by topic.
* Optional replay: a ROUTER socket bound at ``replay_endpoint`` keeps the last ``buffer_steps``
  messages. A DEALER sends ``[b"", start_seq (8 bytes big-endian)]`` and receives ``[b"", seq, payload]``
  for every buffered message with ``seq >= start_seq``, then ``[b"", seq = -1 (8 bytes, two's
  complement), b""]``.

PUB sends never block (a full queue drops, like any PUB). The topic convention of llm-d is
``kv@<host:port>@<model>`` (:func:`default_topic`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio

from igw_sim.kvevents import EventFormat, KVEvent, encode_batch

__all__ = ["END_SEQ", "KVEventsConfig", "ZmqEventPublisher", "default_topic", "offset_endpoint", "should_bind"]

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Sequence number of the replay end marker."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """Where and how one fleet publishes (vLLM ``--kv-events-config`` fields, plus the encoding)."""

    endpoint: str
    """PUB address (bound or connected, see the module docs)."""
    replay_endpoint: str | None = None
    """ROUTER address for replay (always bound)."""
    topic: str | None = None
    """Topic; ``None`` means ``kv@<host:port>@<first model>``. ``{endpoint}`` and ``{model}`` are expanded."""
    event_format: EventFormat = "map"
    int_hashes: bool = True
    buffer_steps: int = 10_000
    hwm: int = 100_000


def should_bind(endpoint: str) -> bool:
    """vLLM's rule: bind wildcard, IPv6-any, ipc and inproc endpoints; connect to anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint(endpoint: str, offset: int, *, bound: bool | None = None) -> str:
    """The endpoint of the ``offset``-th engine sharing one configuration (vLLM's data-parallel offset).

    Connected TCP endpoints are shared (every engine connects to the same subscriber); bound TCP ports
    are shifted by ``offset``; ipc/inproc names get a ``_dp<offset>`` suffix. ``bound`` overrides the
    bind rule (a replay endpoint is always bound).
    """
    if offset == 0:
        return endpoint
    if endpoint.startswith(("ipc://", "inproc://")):
        return f"{endpoint}_dp{offset}"
    if endpoint.startswith("tcp://") and (should_bind(endpoint) if bound is None else bound):
        base, _, port = endpoint.rpartition(":")
        if port.isdigit():
            return f"{base}:{int(port) + offset}"
    return endpoint  # a connected endpoint, or a wildcard port (each socket gets its own)


def default_topic(endpoint: str, model: str) -> str:
    return f"kv@{endpoint}@{model}"


class ZmqEventPublisher:
    """One engine's PUB socket (and optional ROUTER replay socket). Use from one event loop."""

    def __init__(
        self,
        *,
        endpoint: str,
        topic: str,
        replay_endpoint: str | None = None,
        event_format: EventFormat = "map",
        int_hashes: bool = True,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self._topic = topic.encode("utf-8")
        self._format: EventFormat = event_format
        self._int_hashes = int_hashes
        self._rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        try:
            if should_bind(endpoint):
                self._pub.bind(endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint is not None:
                self._replay = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(replay_endpoint)
                self._replay_task = asyncio.get_running_loop().create_task(
                    self._serve_replay(), name="igw-sim-kv-replay"
                )
        except BaseException:
            self._close_sockets()
            raise

    @property
    def bound_endpoint(self) -> str:
        """The PUB socket's last bound or connected address (useful with ``tcp://127.0.0.1:*``)."""
        value = self._pub.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def replay_bound_endpoint(self) -> str | None:
        if self._replay is None:
            return None
        value = self._replay.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Send one batch (one engine step's events). Never blocks."""
        if not events:
            return
        payload = encode_batch(
            time.time(),
            list(events),
            fmt=self._format,
            int_hashes=self._int_hashes,
            data_parallel_rank=self._rank,
        )
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                _log.warning("igw-sim: invalid KV replay request with %d frames", len(frames))
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await sock.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            await sock.send_multipart([client, b"", END_SEQ, b""])

    async def aclose(self) -> None:
        task, self._replay_task = self._replay_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
