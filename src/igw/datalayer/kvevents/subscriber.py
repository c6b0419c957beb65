"""Receive the engines' KV-cache events over ZMQ and apply them, in order, to a :class:`KVBlockIndex`.

**Sockets.** One SUB socket, subscribed to the topic prefix (``kv@``), which can do both:

* *bind* a local address that the engines connect to (vLLM connects when its ``endpoint`` names a
  concrete host, e.g. ``tcp://<epp>:5557``); every engine's stream arrives on it, told apart by topic;
* *connect* to each engine's publisher (vLLM binds when its endpoint is ``tcp://*:port``):
  :meth:`KVEventSubscriber.set_publishers` follows the pool, connecting to new endpoints and
  disconnecting from gone ones (:func:`publisher_address` fills an address template).

The endpoint a message belongs to comes from its topic, ``kv@<host:port>@<model>``, and must be the
pool's address of that endpoint. Messages of endpoints outside the pool are dropped and counted.

**Order.** ZMQ keeps each publisher's messages in order; each stream (topic and data-parallel rank)
carries a sequence number, and the subscriber applies a message only if it is the next one:

* an old number is a duplicate and is dropped, unless the batch is *newer* than the last one applied
  (its timestamp) or the number jumped back by more than ``restart_window``: then the engine restarted
  (its cache is empty, its numbering starts at 0 again), so its entries are dropped and the stream
  starts over;
* a gap (messages were lost: a full queue, a reconnect) asks the engine's replay socket, if one is
  configured (:meth:`KVEventSubscriber.set_replay_endpoints`), for everything from the first missing
  number: a DEALER sends ``[b"", start_seq]`` to the engine's ROUTER and reads ``[b"", seq, payload]``
  until the end marker ``seq = 2**64 - 1``, within ``replay_timeout_s``. Without replay, or if the
  replay does not cover the gap, the endpoint's entries are dropped before going on: a missed
  ``BlockRemoved`` would otherwise leave a false hit, and correctness beats a warm index;
* the first message of a stream with a number above 0 (the EPP started after the engine) is
  treated the same way, replaying from 0 if possible (``replay_on_join``) and otherwise starting from it.
  Starting from a suffix of a stream is safe: a block whose parent was stored earlier is not indexed.

The replay runs inline: the socket's queue holds the other engines' messages meanwhile, and the wait
is bounded by the timeout. Everything runs on the event loop, like the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from igw import aio
from igw.api.types import Endpoint
from igw.datalayer.kvevents.index import KVBlockIndex
from igw.datalayer.kvevents.metrics import KVEventMetrics
from igw.datalayer.kvevents.wire import (
    SEQ_END,
    TOPIC_PREFIX,
    EventBatch,
    KVEventDecodeError,
    decode_message,
    decode_payload,
    decode_seq,
    parse_topic,
)

__all__ = ["KVEventSubscriber", "publisher_address"]

log = logging.getLogger("igw.datalayer.kvevents")

_StreamKey = tuple[str, int | None]  # (topic, data-parallel rank)


def publisher_address(template: str, endpoint: str, *, port_offset: int = 0) -> str:
    """Fill an address template for one pool endpoint (``host:port``).

    Fields: ``{host}`` (IPv6 in brackets), ``{port}`` and ``{kv_port}`` (``port + port_offset``); for
    example ``"tcp://{host}:{kv_port}"`` or ``"tcp://{host}:5557"``.
    """
    host, port = Endpoint.parse_address(endpoint)
    return template.format(host=f"[{host}]" if ":" in host else host, port=port, kv_port=port + port_offset)


@dataclass(slots=True)
class _Stream:
    endpoint: str
    last: int
    last_ts: float


class KVEventSubscriber(aio.Service):
    def __init__(
        self,
        index: KVBlockIndex,
        *,
        bind: str | None = None,
        topic_filter: str = TOPIC_PREFIX,
        replay_timeout_s: float = 2.0,
        replay_on_join: bool = True,
        restart_window: int = 10_000,
        metrics: KVEventMetrics | None = None,
        rcvhwm: int = 100_000,
    ) -> None:
        """``bind``: a local address the engines connect to (``None``: connect mode only, see
        :meth:`set_publishers`). ``restart_window``: a sequence number this far behind the last one
        means the engine restarted, whatever its timestamp (also the most messages one replay may return; vLLM buffers 10,000).
        ``metrics``: without them, counts go to a private registry."""
        self.index = index
        self.bind = bind
        self.topic_filter = topic_filter
        self.replay_timeout_s = replay_timeout_s
        self.replay_on_join = replay_on_join
        self.restart_window = restart_window
        self.metrics = metrics or KVEventMetrics(CollectorRegistry())
        self._rcvhwm = rcvhwm
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._publishers: dict[str, str] = {}
        self._connected: set[str] = set()
        self._replay: dict[str, str] = {}
        self._known: frozenset[str] | None = None
        self._streams: dict[_StreamKey, _Stream] = {}
        self._applied = {
            kind: self.metrics.applied.labels(kind) for kind in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
        }

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter.encode())
        try:
            if self.bind is not None:
                sock.bind(self.bind)
        except zmq.ZMQError:
            sock.close(linger=0)
            ctx.term()
            raise
        self._ctx, self._sock = ctx, sock
        self._sync_connections()
        self._task = aio.spawn(self._run(), name="igw-kv-events")
        log.info(
            "KV events: subscribed to %r (bound %s, %d publishers)",
            self.topic_filter,
            self.bound_endpoint,
            len(self._publishers),
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await aio.cancel_and_wait(task)
        ctx, sock, self._ctx, self._sock = self._ctx, self._sock, None, None
        self._connected.clear()
        if sock is not None:
            sock.close(linger=0)
        if ctx is not None:
            ctx.term()

    @property
    def bound_endpoint(self) -> str | None:
        """The bound address as ZMQ resolved it (a ``tcp://127.0.0.1:*`` bind gets its port here)."""
        if self._sock is None or self.bind is None:
            return None
        value = self._sock.getsockopt(zmq.LAST_ENDPOINT)
        return value.decode() if isinstance(value, bytes) else str(value)

    # -- the pool -----------------------------------------------------------------------------------

    def set_publishers(self, publishers: Mapping[str, str]) -> None:
        """Connect mode: ``endpoint (host:port) -> publisher address``. Endpoints that are gone (or whose
        address changed) are disconnected and their entries dropped: their removals would go unheard."""
        new = dict(publishers)
        for endpoint, address in self._publishers.items():
            if new.get(endpoint) != address:
                self._forget(endpoint)
        self._publishers = new
        self._sync_connections()
        self._forget_unaccepted()

    def set_replay_endpoints(self, replay: Mapping[str, str]) -> None:
        """``endpoint (host:port) -> replay (ROUTER) address``; endpoints without one clear on a gap."""
        self._replay = dict(replay)

    def set_known_endpoints(self, endpoints: Iterable[str] | None) -> None:
        """Accept messages only from these endpoints (``None``: from any in bind mode, from the
        publishers in connect mode). Endpoints no longer accepted are forgotten."""
        self._known = None if endpoints is None else frozenset(endpoints)
        self._forget_unaccepted()

    def accepts(self, endpoint: str) -> bool:
        if self._known is not None:
            return endpoint in self._known
        if self.bind is None:
            return endpoint in self._publishers
        return True

    def _sync_connections(self) -> None:
        sock = self._sock
        if sock is None:
            return
        wanted = set(self._publishers.values())
        for address in self._connected - wanted:
            with contextlib.suppress(zmq.ZMQError):  # already gone
                sock.disconnect(address)
        for address in wanted - self._connected:
            try:
                sock.connect(address)
            except zmq.ZMQError as exc:
                log.warning("KV events: cannot connect to %s: %s", address, exc)
                continue
            self._connected.add(address)
        self._connected &= wanted

    def _forget_unaccepted(self) -> None:
        seen = set(self.index.endpoints()) | {s.endpoint for s in self._streams.values()}
        for endpoint in seen:
            if not self.accepts(endpoint):
                self._forget(endpoint)

    def _forget(self, endpoint: str) -> None:
        self.index.remove_endpoint(endpoint)
        for key in [k for k, s in self._streams.items() if s.endpoint == endpoint]:
            del self._streams[key]

    # -- messages -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            try:
                await self.handle(frames)
            except Exception:  # the lane must survive anything one message does
                log.exception("KV events: failed to handle a message")

    async def handle(self, frames: Sequence[bytes]) -> None:
        """Decode one ``[topic, seq, payload]`` message and apply it in order (replaying a gap first)."""
        self.metrics.received.inc()
        try:
            message = decode_message(frames)
            endpoint, _model = parse_topic(message.topic)
        except KVEventDecodeError as exc:
            self._decode_error(exc)
            return
        if not self.accepts(endpoint):
            self.metrics.dropped_unknown_endpoint.inc()
            return
        batch = message.batch
        key: _StreamKey = (message.topic, batch.data_parallel_rank)
        stream = self._streams.get(key)
        seq = message.seq
        if stream is not None and seq <= stream.last:
            if batch.ts <= stream.last_ts and stream.last - seq <= self.restart_window:
                self.metrics.duplicates.inc()
                return
            log.info("KV events: %s restarted its stream (seq %d after %d)", endpoint, seq, stream.last)
            self._clear(endpoint)
            del self._streams[key]
            stream = None
        expected = 0 if stream is None else stream.last + 1
        if seq > expected and stream is not None:
            self.metrics.gaps.inc()
        replay = self._replay.get(endpoint)
        if seq > expected and replay is not None and (stream is not None or self.replay_on_join):
            replayed = await self._fetch_replay(replay, expected, rank=batch.data_parallel_rank)
            if not self.accepts(endpoint):  # the pool changed while we waited
                self.metrics.dropped_unknown_endpoint.inc()
                return
            for r_seq, r_batch in replayed:
                self._sequenced(key, endpoint, r_seq, r_batch)
        self._sequenced(key, endpoint, seq, batch)

    def _sequenced(self, key: _StreamKey, endpoint: str, seq: int, batch: EventBatch) -> None:
        """Apply one message if it is new; a gap in an existing stream drops the endpoint's entries first."""
        stream = self._streams.get(key)
        if stream is None:
            self._streams[key] = _Stream(endpoint, seq, batch.ts)  # a first message: a suffix of a stream is safe
        elif seq <= stream.last:
            return  # already applied (the replay covered it)
        else:
            if seq != stream.last + 1:
                log.info(
                    "KV events: %s missed messages %d..%d; dropping its entries", endpoint, stream.last + 1, seq - 1
                )
                self._clear(endpoint)
            stream.last, stream.last_ts = seq, batch.ts
        self._apply(endpoint, batch)

    def _apply(self, endpoint: str, batch: EventBatch) -> None:
        if batch.skipped:
            self.metrics.skipped_unknown_type.inc(batch.skipped)
        index = self.index
        try:
            for event in batch.events:
                index.apply(endpoint, event)
                self._applied[type(event).__name__].inc()
        except Exception:  # a bug in the index: its view of this endpoint can no longer be trusted
            log.exception("KV events: applying a batch of %s failed; dropping its entries", endpoint)
            self._clear(endpoint)

    def _clear(self, endpoint: str) -> None:
        self.metrics.endpoint_clears.inc()
        self.index.clear_endpoint(endpoint)

    def _decode_error(self, exc: KVEventDecodeError) -> None:
        self.metrics.decode_errors.inc()
        log.warning("KV events: dropped an undecodable message: %s", exc)

    # -- replay -------------------------------------------------------------------------------------

    async def _fetch_replay(self, address: str, start: int, *, rank: int | None) -> list[tuple[int, EventBatch]]:
        """What the engine's replay socket still holds from ``start`` on (``[]`` on failure: counted)."""
        if self._ctx is None:  # not started: nothing to replay with
            return []
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[tuple[int, EventBatch]] = []
        outcome = "ok"
        try:
            sock.connect(address)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            async with asyncio.timeout(self.replay_timeout_s):
                while True:
                    frames = await sock.recv_multipart()
                    if len(frames) != 3 or frames[0]:
                        raise KVEventDecodeError(f"replay answer has {len(frames)} frames")
                    seq = decode_seq(frames[1])
                    if seq == SEQ_END:
                        break
                    try:
                        batch = decode_payload(frames[2])
                    except KVEventDecodeError as exc:
                        self._decode_error(exc)
                        continue  # leaves a gap that _sequenced handles
                    if batch.data_parallel_rank == rank:
                        out.append((seq, batch))
                    if len(out) > self.restart_window:
                        break
        except TimeoutError:
            outcome = "timeout"
        except (zmq.ZMQError, KVEventDecodeError) as exc:
            log.warning("KV events: replay from %s failed: %s", address, exc)
            outcome = "error"
        finally:
            sock.close(linger=0)
        if outcome == "ok" and (not out or out[0][0] != start):
            outcome = "incomplete"
        self.metrics.replays.labels(outcome).inc()
        log.info("KV events: replay from %s at %d: %s (%d messages)", address, start, outcome, len(out))
        return out if outcome in ("ok", "incomplete") else []
