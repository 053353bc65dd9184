"""Transport stages: move the wire stream over ZeroMQ or to/from a file, and replay recorded streams.

- ``zmq-sink`` / ``zmq-src``: PUSH/PULL, the stream in messages of at most 1 MiB
  (large payloads sent without copying); an empty message marks the end of stream.
  ``channels=N`` spreads the stream over N connections (each with its own
  ZeroMQ context, I/O threads and keys) and reassembles it in order at the
  receiver (stages.common.channels). As lanes, ``frame workers=N ! zmq-sink
  channels=N`` and ``zmq-src channels=N workers=N ! deframe`` run fused
  (``FrameZmqSink``, ``ZmqSourceDeframe``): each worker one lane, one channel.
  On tcp both ends run CurveZMQ with keys, or say ``insecure=true``; the end
  that binds admits only allowed keys and at most ``max-connections``
  (stages.common.security, docs/SECURITY.md). The receiver's acknowledgements
  travel on a separate socket (stages.common.acks).
- ``file-sink`` / ``file-src``: the stream as a file (a *trace*), the same
  bytes as on the wire.
- ``trace-src``: replays a trace as the tracker stream it was made from:
  decodes each epoch onto a page image and emits the touched pages whole
  (``preload=true``: the whole trace decoded before the first batch). It
  fuses with the built-in page consumers after it of as many workers
  (``classify ! xor-delta ! rle``, exact classes only), so the pages stay in
  its process; with ``workers=N`` worker k replays the pages of xor-delta
  shard k (page % N).
- ``write_trace_from_npz``: turns the recorded corpus (.npz) into a trace.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, cast

import numpy as np
import zmq

from pipeline.batch import ENCODED, PAGES, STREAM, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData, TransportError
from pipeline.fusion import Fusion
from pipeline.stage import Property, Stage, StageContext
from pipeline.worker import await_disconnect

from .classify import Classify
from .xor_delta import XorDelta
from .codecs import ChainCodec, Encoded, EntropyCodec, PageCodec, get_codec
from .common import wire
from .common.channels import (END, MAX_CHANNELS, LaneReceiver, LaneSender, Reassembler, Spreader, channel_endpoints,
                              parse_envelope)
from .framer import Deframe, Frame, deframe_stream
from .common.pages import combine_digests, digest_pages, find_zero_pages
from .common.security import CurveProperties, Gatekeeper, LinkSecurity

_ZERO_COPY_BYTES = 64 << 10
WAITING_NOTICE_MS = 1000
"""A receiver with nothing after this long says what it waits for (an event on the bus)."""
_END_MESSAGE = b""
MESSAGE_BYTES = 1 << 20
"""zmq-sink sends the stream in messages of at most this size; zmq-src's max-message is never below it."""
CURVE_FRAME_OVERHEAD = 64
"""What CurveZMQ adds to a frame on the wire (33 bytes: command name, nonce, MAC, flags), which is what
ZeroMQ checks against ZMQ_MAXMSGSIZE; rounded up."""
_PEER_COMMAND_BYTES = 64 << 10
"""Largest frame a zmq-sink accepts from its receiver, which sends only handshake commands."""
_REFUSALS_POLL_MS = 1000
_REFUSALS_POST_EVERY = 0.25
"""zmq-sink collects its gatekeepers' refusals at most this often (seconds), not at every batch."""


def _payload_of(batch: Batch) -> np.ndarray | None:
    return batch.payload if batch.payload is not None and batch.payload.size else None


# ---- ZeroMQ ---------------------------------------------------------------------

class _ZmqStage(CurveProperties, Stage):
    """Shared socket set-up of zmq-sink and zmq-src: one socket per channel, bound or connected, its keys and
    counters.

    On tcp both ends need keys (stages.common.security) unless insecure=true; the end that binds
    admits only the peers on its allow-list and at most max-connections at once. Each channel has a
    ZeroMQ context of its own (its I/O threads do its encryption; its gatekeeper answers its peers).
    """

    socket_type: int = zmq.PUSH
    bytes_counter = "bytes_out"     # counts the bytes this stage moves
    bind: bool                      # a property of each subclass, with its own default
    endpoint = Property("endpoint", "", "ZeroMQ endpoint, tcp://host:port or ipc://path (with channels=N: the "
                        "first of N consecutive ports or paths path, path.1, ..., or N endpoints, comma-separated)",
                        required=True, several=True)
    channels = Property("int", 1, "Connections the stream is spread over, each with its own ZeroMQ context "
                                  "(stages.common.channels); sender and receiver must agree",
                        minimum=1, maximum=MAX_CHANNELS)

    in_lanes = False
    """Set by the fused stage (frame+zmq-sink, zmq-src+deframe) whose workers each carry one lane; a plain
    stage with several workers would split one stream's bytes among them."""

    def start(self, context: StageContext) -> None:
        super().start(context)
        if not self.endpoint:
            raise TransportError(f"{self.factory_name}: no endpoint= given")
        endpoints = channel_endpoints(self.endpoint, self.channels)
        self._lane: int | None = None
        if context.worker_count > 1:
            endpoints = [endpoints[self._lane_of(context)]]
        self._endpoints = endpoints     # the ones this worker serves, one per socket
        # the endpoint(s) this worker serves, as its messages name them
        self._where = f"{endpoints[0]} (lane {self._lane})" if self._lane is not None else self.endpoint
        securities = [self.link_security(endpoint, self.bind) for endpoint in endpoints]
        self._links: list[tuple[zmq.Context, zmq.Socket, Gatekeeper | None]] = []
        try:
            for endpoint, security in zip(endpoints, securities):
                self._links.append(self._open(endpoint, security))
        except BaseException:
            self.stop()
            raise
        self._sockets = [sock for _, sock, _ in self._links]
        self._socket = self._sockets[0]
        self.counters.update({"messages": 0, self.bytes_counter: 0})

    def _lane_of(self, context: StageContext) -> int:
        """This worker's lane (and channel): workers=N carry one lane each (stages.common.channels)."""
        count = context.worker_count
        if not self.in_lanes:
            raise ConfigError(f"{self.factory_name}: workers={count} carries one lane per worker: "
                              f"{self.lane_pairing} right beside it, with channels={count}")
        if self.channels != count:
            raise ConfigError(f"{self.factory_name}: workers={count} needs channels={count} (one channel per "
                              f"worker), not channels={self.channels}")
        self._lane = context.worker_index
        return self._lane

    lane_pairing = ""
    """What a stage of several workers must be linked with (in words, for the error)."""

    def _open(self, endpoint: str, security: LinkSecurity) -> tuple[zmq.Context, zmq.Socket, Gatekeeper | None]:
        context = security.context()
        sock = context.socket(self.socket_type)
        self._configure(sock)
        gatekeeper = None
        try:
            gatekeeper = security.apply(sock)
            (sock.bind if self.bind else sock.connect)(endpoint)
        except (zmq.ZMQError, TransportError) as exc:
            self._close_link(context, sock, gatekeeper)
            verb = "bind" if self.bind else "connect"
            raise TransportError(f"{self.factory_name}: cannot {verb} {endpoint}: {exc}") from None
        return context, sock, gatekeeper

    def _configure(self, sock: zmq.Socket) -> None:
        """Socket options set before bind/connect."""

    def _post_refusals(self) -> None:
        """Post the gatekeepers' refusals (peers without an allowed key, connections beyond the limit)."""
        totals: dict[str, int] = {}
        for _, _, gatekeeper in getattr(self, "_links", ()):
            if gatekeeper is not None:
                for text in gatekeeper.take_warnings():
                    self.context.warn(text)
                for key, value in gatekeeper.counters.items():
                    totals[key] = totals.get(key, 0) + value
        self.counters.update(totals)

    def _close_link(self, context: zmq.Context, sock: zmq.Socket, gatekeeper: Gatekeeper | None) -> None:
        if gatekeeper is not None:
            for text in gatekeeper.take_warnings():
                self.context.warn(text)
            gatekeeper.close()
        sock.close()
        context.term()

    def stop(self) -> None:
        links = getattr(self, "_links", None)
        if links:
            self._post_refusals()
            self._links, self._sockets = [], []
            self.__dict__.pop("_socket", None)   # closed below with its link
            for link in links:
                self._close_link(*link)


class ZmqSink(_ZmqStage):
    factory_name = "zmq-sink"
    description = "Send the wire stream over ZeroMQ (PUSH), one message per batch"
    input_caps = (STREAM,)
    output_caps = None
    max_workers = MAX_CHANNELS
    socket_type = zmq.PUSH
    lane_pairing = "frame workers=N"

    bind = Property("bool", False, "Bind the endpoint (default: connect to a receiver that binds)")
    timeout = Property("duration", "10s", "Longest wait for a receiver to take a message; then TransportError",
                       minimum=0.001)
    hwm = Property("int", 8, "Messages queued towards the receiver before sending blocks", minimum=1)

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.MAXMSGSIZE, _PEER_COMMAND_BYTES)   # a receiver sends nothing but handshake commands
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        sock.setsockopt(zmq.LINGER, int(self.timeout * 1000))     # flush what is queued at stop, for a while
        sock.setsockopt(zmq.IMMEDIATE, 1)       # queue only to completed connections: an absent peer blocks

    def start(self, context: StageContext) -> None:
        self._monitors: list[zmq.Socket] = []
        super().start(context)
        self._spreader = Spreader(self.channels) if self.channels > 1 and self._lane is None else None
        self._lanes = LaneSender(self._lane, self.channels) if self._lane is not None else None
        self._refusals_due = 0.0
        self._monitors = [sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) for sock in self._sockets]

    def process(self, batch: Batch) -> Iterator[Batch]:
        payload = _payload_of(batch)
        if payload is not None:   # the stream is bytes: pieces of at most MESSAGE_BYTES fit any receiver's limit
            view = payload.data.cast("B")
            for start in range(0, len(view), MESSAGE_BYTES):
                if self._lanes is not None:
                    self._send(self._socket, view[start:start + MESSAGE_BYTES], self._lanes.next(batch.epoch))
                elif self._spreader is None:
                    self._send(self._socket, view[start:start + MESSAGE_BYTES])
                else:
                    channel, envelope = self._spreader.next(batch.epoch)
                    self._send(self._sockets[channel], view[start:start + MESSAGE_BYTES], envelope)
        now = time.monotonic()
        if now >= self._refusals_due:    # the gatekeepers' news, at most a few times a second
            self._refusals_due = now + _REFUSALS_POST_EVERY
            self._post_refusals()
        return iter(())

    def control(self, batch: Batch) -> Iterator[Batch]:
        yield from self.process(batch)
        if batch.flags & Flag.END_OF_STREAM:
            self._post_refusals()
            self._forget_disconnects()
            if self._lanes is not None:
                self._send(self._socket, _END_MESSAGE, self._lanes.next(batch.epoch, end=True))
            elif self._spreader is None:
                self._send(self._socket, _END_MESSAGE)
            else:
                for sock, envelope in zip(self._sockets, self._spreader.ends()):
                    self._send(sock, _END_MESSAGE, envelope)
            self._await_receivers_closing()

    def _forget_disconnects(self) -> None:
        """Drop the disconnects seen so far (connections replaced during the stream)."""
        for monitor in self._monitors:
            while monitor.poll(0):
                monitor.recv_multipart()

    def _await_receivers_closing(self) -> None:
        """Wait (up to ``timeout``) until each channel's receiver has closed its connection after the end.

        Without this the last messages of a stream could vanish after a clean exit (``await_disconnect``;
        seen over ipc:// when the receiver's queue is full). zmq-src closes its connections as soon as it has
        the end message.
        """
        deadline = time.monotonic() + self.timeout
        for endpoint, monitor in zip(self._endpoints, self._monitors):
            if not await_disconnect(monitor, deadline):
                self.context.warn(f"{self.factory_name}: the receiver at {endpoint} did not close its "
                                  f"connection within {self.timeout:g} s of the stream's end; it may have "
                                  f"missed the last messages (a receiver should close once it has the end)")

    def stop(self) -> None:
        for sock, monitor in zip(getattr(self, "_sockets", ()), getattr(self, "_monitors", ())):
            sock.disable_monitor()
            monitor.close(linger=0)
        self._monitors = []
        super().stop()

    def _send(self, sock: zmq.Socket, data, envelope: bytes | None = None) -> None:
        """Send ``data`` (led by its channel envelope when there are several channels)."""
        size = len(data)
        if not self.counters["messages"]:   # the first message says whether a receiver is there
            if not self._socket.poll(WAITING_NOTICE_MS, zmq.POLLOUT):
                self.context.event("waiting", f"waiting for a receiver at {self._where} (up to {self.timeout:g} s)")
        try:
            if envelope is not None:
                sock.send(envelope, zmq.SNDMORE)   # once the first part is queued, the rest is too
            sock.send(data, copy=size < _ZERO_COPY_BYTES)
        except zmq.Again:
            raise TransportError(f"{self.factory_name}: no receiver took data at {self._where} "
                                 f"within {self.timeout:g} s (unreachable or not running)") from None
        except zmq.ZMQError as exc:
            raise TransportError(f"{self.factory_name}: sending to {self._where} failed: {exc}") from None
        if not self.counters["messages"]:
            self.context.event("connected", f"sending to a receiver at {self._where}")
        self.counters["messages"] += 1
        self.counters["bytes_out"] += size


class ZmqSource(_ZmqStage):
    factory_name = "zmq-src"
    description = "Receive the wire stream over ZeroMQ (PULL), one batch per message"
    output_caps = STREAM
    max_workers = MAX_CHANNELS
    socket_type = zmq.PULL
    bytes_counter = "bytes_in"
    lane_pairing = "deframe"

    bind = Property("bool", True, "Bind the endpoint (default; false: connect to a sender that binds)")
    timeout = Property("duration", 0, "Longest wait for the next message before TransportError; 0 waits forever",
                       minimum=0)
    max_message = Property("size", "1MiB", "Messages (ZeroMQ frames) larger than this are refused by ZeroMQ as they "
                           "are announced, and the peer dropped (zmq-sink sends at most 1 MiB)",
                           minimum=MESSAGE_BYTES, maximum=1 << 30)
    hwm = Property("int", 8, "Messages queued from each sender before it blocks", minimum=1)
    failover = Property("bool", False, "Failure detection: once the sender was heard, declare it lost after "
                        "failover-after without a message (its heartbeats included) and send SENDER_LOST on")
    failover_after = Property("duration", "1s", "Silence after which failover declares the sender lost; longer "
                              "than the sender's heartbeat and than any blip it should ride out", minimum=0.01)

    def _configure(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message + CURVE_FRAME_OVERHEAD)

    def start(self, context: StageContext) -> None:
        if self.failover and context.worker_count > 1:
            raise ConfigError(f"{self.factory_name}: failover=true is not supported with workers="
                              f"{context.worker_count} (lanes); use workers=1")
        super().start(context)
        self._lane_receiver = LaneReceiver(self._lane, self.channels) if self._lane is not None else None

    def produce(self) -> Iterator[Batch | None]:
        if self.channels > 1 and self._lane_receiver is None:
            yield from self._produce_from_channels()
            return
        lanes = self._lane_receiver
        sequence = 0
        last_heard: float | None = None     # monotonic time of the last message; None until one came
        waited_since = time.monotonic()
        said_waiting = False
        while True:
            message = self._next_message(waited_since, last_heard)
            if message is None:     # idle_every passed, or the sender fell silent
                now = time.monotonic()
                if sequence == 0 and not said_waiting and now - waited_since >= WAITING_NOTICE_MS / 1000:
                    self.context.event("waiting", f"waiting for a sender on {self._where} (nothing received yet)")
                    said_waiting = True
                if self.failover and last_heard is not None and now - last_heard >= self.failover_after:
                    yield self._sender_lost(last_heard, now)
                    last_heard = None   # armed again by the next message (a returning sender)
                else:
                    yield None
                continue
            last_heard = waited_since = time.monotonic()
            self.counters["messages"] += 1
            if lanes is not None:
                message = self._lane_message(lanes, message)
                if message is None:
                    continue
            elif message.more:
                self._refuse_multipart()
                continue
            if sequence == 0:
                self.context.event("connected", f"receiving from a sender on {self._where}")
            if len(message) == 0:
                self.stop()     # closing at once tells the sender everything arrived (ZmqSink._await_receivers_closing)
                yield Batch.control(Flag.END_OF_STREAM, 0, format=STREAM, sequence=sequence)
                return
            self.counters["bytes_in"] += len(message)
            payload = np.frombuffer(message.buffer, dtype=np.uint8)
            yield Batch(format=STREAM, sequence=sequence, payload=payload)
            sequence += 1

    def fuse(self, downstream: Stage) -> Stage | None:
        """With workers=N, run a built-in deframe in this stage's process (``ZmqSourceDeframe``): each worker
        receives and checks one lane. One worker is not fused (see ``Frame.fuse``)."""
        if type(self) is not ZmqSource or type(downstream) is not Deframe or self.workers == 1 \
                or downstream.workers != 1:
            return None
        return ZmqSourceDeframe.around(self, downstream)

    def _sender_lost(self, last_heard: float, now: float) -> Batch:
        """The SENDER_LOST marker: nothing arrived for failover-after (heartbeats included)."""
        self.counters["senders_lost"] = self.counters.get("senders_lost", 0) + 1
        silence = now - last_heard
        self.context.warn(f"{self.factory_name}: nothing from the sender on {self._where} for {silence:.2f} s "
                          f"(failover-after={self.failover_after:g} s): it is lost")
        return Batch.control(Flag.SENDER_LOST, 0, format=STREAM, silence=silence,
                             last_heard=time.time() - silence)

    def _poll_ms(self, began: float, waited_since: float, last_heard: float | None) -> int:
        """How long to wait for a message: until the next refusal report, idle tick, timeout or failover."""
        now = time.monotonic()
        waits = [_REFUSALS_POLL_MS / 1000]
        if self.idle_every:
            waits.append(began + self.idle_every - now)
        if self.timeout:
            waits.append(waited_since + self.timeout - now)
        if self.failover and last_heard is not None:
            waits.append(last_heard + self.failover_after - now)
        return max(0, math.ceil(min(waits) * 1000))

    def _next_message(self, waited_since: float, last_heard: float | None) -> zmq.Frame | None:
        """The next frame, or None once ``idle_every`` passed without one (the executor's timers run) or the
        sender was silent for failover-after; posts refusals while waiting; TransportError after ``timeout``
        without a frame."""
        began = time.monotonic()
        while True:
            if self._socket.poll(self._poll_ms(began, waited_since, last_heard), zmq.POLLIN):
                return self._socket.recv(copy=False)
            self._post_refusals()
            now = time.monotonic()
            if self.failover and last_heard is not None and now - last_heard >= self.failover_after:
                return None
            if self.timeout and now - waited_since >= self.timeout:
                raise TransportError(f"{self.factory_name}: nothing received on {self._where} "
                                     f"for {self.timeout:g} s")
            if self.idle_every and now - began >= self.idle_every:
                return None

    def _lane_message(self, lanes: LaneReceiver, envelope: zmq.Frame) -> zmq.Frame | None:
        """The payload of a lane message led by ``envelope`` (checked), or None when it is to be dropped."""
        if not envelope.more:
            raise CorruptData(f"{self.factory_name}: channel {lanes.lane}: a message of one part, expected an "
                              f"envelope and a payload (is the sender framing with frame workers={lanes.lanes} "
                              f"! zmq-sink channels={lanes.lanes}?)")
        payload = self._socket.recv(copy=False)
        if payload.more:
            raise CorruptData(f"{self.factory_name}: channel {lanes.lane}: a message of more than two parts")
        accepted = lanes.accept(envelope.buffer)
        self.counters["dropped_messages"] = lanes.dropped
        if accepted is not None and accepted.end != (len(payload) == 0):
            raise CorruptData(f"{self.factory_name}: channel {lanes.lane}: message #{accepted.index} has "
                              f"{len(payload)} bytes but its envelope {'ends' if accepted.end else 'does not end'} "
                              f"the lane")
        return payload if accepted is not None else None

    def _refuse_multipart(self) -> None:
        """zmq-sink never sends multipart messages: drop one whole, so it cannot pass for stream bytes."""
        while self._socket.getsockopt(zmq.RCVMORE):
            self._socket.recv(copy=False)
        self.counters["multipart_refused"] = self.counters.get("multipart_refused", 0) + 1
        self.context.warn(f"{self.factory_name}: dropped a multipart message on {self._where} "
                          f"(not from zmq-sink, or from one with channels= set: set the same channels= here)")

    def _produce_from_channels(self) -> Iterator[Batch | None]:
        """Messages from every channel, checked and handed on in stream order (stages.common.channels), with
        the single channel's timeout, failover, idle ticks and refusal reports."""
        reassembler = Reassembler(self.channels, limit=max(2, self.hwm),
                                  starts_segment=lambda message: wire.starts_segment(cast(zmq.Frame, message).buffer))
        poller, registered = zmq.Poller(), set()
        self.counters.update(dropped_messages=0)
        sequence = 0
        last_heard: float | None = None
        waited_since = began = time.monotonic()
        while True:
            for channel, sock in enumerate(self._sockets):
                wanted = reassembler.wants(channel)
                if wanted and channel not in registered:
                    poller.register(sock, zmq.POLLIN)
                    registered.add(channel)
                elif not wanted and channel in registered:
                    poller.unregister(sock)
                    registered.discard(channel)
            ready = dict(poller.poll(self._poll_ms(began, waited_since, last_heard)))
            if not ready:
                self._post_refusals()
                now = time.monotonic()
                if self.failover and last_heard is not None and now - last_heard >= self.failover_after:
                    yield self._sender_lost(last_heard, now)
                    last_heard = None
                elif self.timeout and now - waited_since >= self.timeout:
                    raise TransportError(f"{self.factory_name}: nothing received on {self.endpoint} "
                                         f"({self.channels} channels) for {self.timeout:g} s")
                elif self.idle_every and now - began >= self.idle_every:
                    began = now
                    yield None
                continue
            last_heard = waited_since = time.monotonic()
            for channel, sock in enumerate(self._sockets):
                if sock in ready:
                    frames = sock.recv_multipart(copy=False)
                    self.counters["messages"] += 1
                    if len(frames) != 2:
                        raise CorruptData(f"{self.factory_name}: channel {channel}: message of {len(frames)} "
                                          f"parts, expected an envelope and a payload (is the sender using "
                                          f"channels={self.channels}?)")
                    envelope = parse_envelope(frames[0].buffer, channel, self.channels)
                    reassembler.push(envelope, frames[1])
            self.counters["dropped_messages"] = reassembler.dropped
            for message in reassembler.ready():
                if message is END:
                    self.stop()     # counts every channel's peers; closing tells the sender everything arrived
                    yield Batch.control(Flag.END_OF_STREAM, 0, format=STREAM, sequence=sequence)
                    return
                frame = cast(zmq.Frame, message)
                self.counters["bytes_in"] += len(frame)
                yield Batch(format=STREAM, sequence=sequence, payload=np.frombuffer(frame.buffer, dtype=np.uint8))
                sequence += 1


# ---- framing and transport in one process -------------------------------------------

class FrameZmqSink(Stage):
    """``frame ! zmq-sink`` as one stage (``Frame.fuse``): the stream's bytes never cross a process boundary.

    Built for ``frame workers=N ! zmq-sink channels=N``: each worker frames the share of every epoch the
    runtime hands it as a lane of its own (docs/FORMAT.md, "Lanes": the same stream identity, every layout,
    commit and end of stream, its own records and sequence numbers) and sends it on channel ``worker`` of N.
    """

    factory_name = "frame+zmq-sink"
    description = "frame and zmq-sink in one process; with workers=N each worker frames and sends one lane"
    input_caps = Frame.input_caps
    output_caps = None
    max_workers = MAX_CHANNELS

    members = Property("object", None, "Set by fusing: (frame properties, zmq-sink properties)", internal=True)
    identity = Property("str", "", "Set by fusing workers=N: the stream identity every lane shares unless the "
                        "stream names one (meta['stream_id'])", internal=True)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        if self.members is None:
            raise ConfigError(f"{self.factory_name}: built by fusing frame with zmq-sink; no members= given")
        frame_properties, sink_properties = self.members
        self._frame, self._sink = Frame(**frame_properties), ZmqSink(**sink_properties)
        self.fusion = Fusion.join(self._frame, self._sink)
        self._framed = self.fusion.link_after(self._frame)

    @classmethod
    def around(cls, frame: Frame, sink: "ZmqSink") -> "FrameZmqSink":
        identity = "" if frame.workers == 1 or frame.stream_id else wire.new_stream_id().hex()
        return cls(members=(frame.property_values(), sink.property_values()), identity=identity)

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._frame.lane_identity = self.identity
        self._frame.in_lanes = self._sink.in_lanes = True
        self._frame.start(context)
        self._sink.start(context)
        self.tick_interval = self._frame.tick_interval
        self._lane_bytes = 0

    def process(self, batch: Batch) -> Iterator[Batch]:
        return self._send(self._frame.handle(batch))

    def control(self, batch: Batch) -> Iterator[Batch]:
        return self._send(self._frame.handle(batch))

    def tick(self) -> Iterator[Batch]:
        return self._send(self._frame.tick())

    def _send(self, framed: Iterable[Batch]) -> Iterator[Batch]:
        for batch in framed:
            self._framed.count(batch)
            self._lane_bytes += batch.nbytes
            for _ in self._sink.handle(batch):
                pass
            if batch.is_control and batch.flags & Flag.EPOCH_END:
                # a lane's wire bytes: a fused node has no wire link to count them; the lanes' records add up
                # to the epoch's wire_bytes
                self.context.record_epoch(batch.epoch, wire_bytes=self._lane_bytes)
                self._lane_bytes = 0
        return iter(())

    def stop(self) -> None:
        try:
            self._sink.stop()
        finally:
            self._frame.stop()


class ZmqSourceDeframe(Stage):
    """``zmq-src ! deframe`` as one stage (``ZmqSource.fuse``): received bytes are checked where they arrive.

    Built for ``zmq-src channels=N workers=N ! deframe``: each worker receives and deframes one lane; the
    runtime's fan-in after it is the epoch barrier across the connections (an epoch passes on once every
    lane's commit was checked, their page counts summed).
    """

    factory_name = "zmq-src+deframe"
    description = "zmq-src and deframe in one process; with workers=N each worker receives and checks one lane"
    output_caps = Deframe.output_caps
    max_workers = MAX_CHANNELS
    back_to_back = True     # frame sends a small epoch as one message: its batches and end come out together,
    #                         so the runtime may send them on as one message (pipeline.stage.Stage.back_to_back)

    members = Property("object", None, "Set by fusing: (zmq-src properties, deframe properties)", internal=True)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        if self.members is None:
            raise ConfigError(f"{self.factory_name}: built by fusing zmq-src with deframe; no members= given")
        source_properties, deframe_properties = self.members
        self._source, self._deframe = ZmqSource(**source_properties), Deframe(**deframe_properties)
        self.fusion = Fusion.join(self._source, self._deframe)
        self._received = self.fusion.link_after(self._source)

    @classmethod
    def around(cls, source: "ZmqSource", deframe: Deframe) -> "ZmqSourceDeframe":
        return cls(members=(source.property_values(), deframe.property_values()))

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._source.in_lanes = True
        self._source.start(context)
        self._deframe.start(context)

    def produce(self) -> Iterator[Batch | None]:
        self._source.idle_every = self.idle_every
        deframe, received = self._deframe, self._received
        lane_bytes = 0
        for batch in self._source.produce():
            if batch is None:
                yield None
                continue
            received.count(batch)
            lane_bytes += batch.nbytes
            for checked in deframe.handle(batch):
                if checked.is_control and checked.flags & Flag.EPOCH_END:
                    self.context.record_epoch(checked.epoch, wire_bytes=lane_bytes)   # as FrameZmqSink
                    lane_bytes = 0
                yield checked

    def stop(self) -> None:
        try:
            self._source.stop()
        finally:
            self._deframe.stop()


# ---- files ----------------------------------------------------------------------

class FileSink(Stage):
    factory_name = "file-sink"
    description = "Write the wire stream to a file (a trace); flushed at every epoch commit"
    input_caps = (STREAM,)
    output_caps = None
    max_workers = 1

    path = Property("str", "", "File to write (created, or truncated if it exists)", required=True)
    fsync = Property("bool", False, "fsync the file at every epoch commit (durable, slower)")

    def start(self, context: StageContext) -> None:
        super().start(context)
        if not self.path:
            raise TransportError(f"{self.factory_name}: no path= given")
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise TransportError(f"{self.factory_name}: cannot create {self.path}: {exc.strerror}") from None
        self._written = 0
        self._committed = 0
        self.counters.update(bytes_out=0, commits=0)

    def process(self, batch: Batch) -> Iterator[Batch]:
        payload = _payload_of(batch)
        if payload is not None:
            self._write(payload.data.cast("B"))
        return iter(())

    def control(self, batch: Batch) -> Iterator[Batch]:
        yield from self.process(batch)
        if batch.flags & (Flag.EPOCH_END | Flag.END_OF_STREAM):
            self._commit()

    def _write(self, data: memoryview) -> None:
        try:
            while data:
                done = os.write(self._fd, data)
                data = data[done:]
                self._written += done
        except OSError as exc:
            self._fail("write", exc)
        self.counters["bytes_out"] = self._written

    def _commit(self) -> None:
        if self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._fail("fsync", exc)
        self._committed = self._written
        self.counters["commits"] += 1

    def _fail(self, action: str, exc: OSError):
        """Cut the file back to its last committed epoch, then raise TransportError."""
        try:
            os.ftruncate(self._fd, self._committed)
            kept = f"kept the first {self._committed} bytes (every committed epoch)"
        except OSError:
            kept = f"could not cut it back to the {self._committed} committed bytes"
        raise TransportError(f"{self.factory_name}: cannot {action} {self.path}: {exc.strerror} "
                             f"(errno {exc.errno}); {kept}") from None

    def stop(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            del self._fd


class FileSource(Stage):
    factory_name = "file-src"
    description = "Read a recorded wire stream (a trace file) in chunks"
    output_caps = STREAM
    max_workers = 1

    path = Property("str", "", "Trace file to read", required=True)
    chunk_size = Property("size", "1MiB", "Bytes per emitted batch", minimum=4096)

    def produce(self) -> Iterator[Batch]:
        sequence = 0
        for chunk in _read_chunks(self.path, self.chunk_size, self.factory_name):
            yield Batch(format=STREAM, sequence=sequence, payload=np.frombuffer(chunk, dtype=np.uint8))
            sequence += 1
        yield Batch.control(Flag.END_OF_STREAM, 0, format=STREAM, sequence=sequence)


def _read_chunks(path: str, chunk_size: int, stage: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as file:
            while chunk := file.read(chunk_size):
                yield chunk
    except OSError as exc:
        raise TransportError(f"{stage}: cannot read {path}: {exc.strerror}") from None


@contextmanager
def _mapped(path: str, stage: str) -> Iterator[np.ndarray]:
    """The whole file as a read-only array backed by the page cache (no copies)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            yield np.memmap(file, dtype=np.uint8, mode="r") if size else np.empty(0, np.uint8)
    except OSError as exc:
        raise TransportError(f"{stage}: cannot read {path}: {exc.strerror}") from None


# ---- trace replay ---------------------------------------------------------------

class TraceSource(Stage):
    factory_name = "trace-src"
    description = "Replay a recorded trace as the tracker stream: touched pages whole, per epoch"
    output_caps = PAGES
    max_workers = MAX_CHANNELS   # workers=N: worker k replays the pages p with p % N == k (every epoch's end)
    back_to_back = True  # a recorded pace waits before an epoch's batches, never between them

    path = Property("str", "", "Trace file written by file-sink (any codec chain)", required=True)
    pace = Property("choice", "fast", "fast: as fast as possible; recorded: at the recorded checkpoint times",
                    choices=("fast", "recorded"))
    batch_pages = Property("int", 256, "Pages per emitted batch", minimum=1)
    max_record = Property("size", "16MiB", "Records with a bigger body are refused as corrupt", minimum=1 << 16)
    max_image = Property("size", "64GiB", "Largest page image a trace's layout may ask for", minimum=1 << 16)
    preload = Property("bool", False, "Decode the whole trace before the first batch and replay it from memory "
                       "(holds every epoch's pages; for benchmarks that time the chain, not the decoding)")

    def fuse(self, downstream: Stage) -> Stage | None:
        """Run a built-in classify or xor-delta of as many workers in this process (``TraceSourceInto``); never a
        subclass or another stage, whose results fusion could change. With workers=N each worker replays the
        pages of one xor-delta shard (page % N), so its fused consumer sees exactly the pages it would own."""
        if type(self) is not TraceSource or type(downstream) not in (Classify, XorDelta) \
                or downstream.workers != self.workers:
            return None
        return TraceSourceInto.around(self, downstream)

    def produce(self) -> Iterator[Batch]:
        self._image = np.zeros((0, 4096), dtype=np.uint8)
        self._touched: list[np.ndarray] = []
        self._codecs: dict[str, PageCodec | ChainCodec] = {}
        self._sequence = 0
        self._clock: tuple[float, float] | None = None   # (recorded time, wall time) of the first epoch
        context = StageContext(stage_name=self.factory_name, post=self.context.post)
        with _mapped(self.path, self.factory_name) as trace:
            steps: Iterable[tuple[float | None, Iterable[Batch]]] = (
                self._replay(batch) for batch in deframe_stream([trace], self.max_record, context))
            if self.preload:
                began = time.process_time()
                steps = [(recorded, list(batches)) for recorded, batches in steps]
                self.counters["preload_cpu_seconds"] = time.process_time() - began
            for recorded, batches in steps:
                self._wait_for(recorded)
                yield from batches

    def _replay(self, batch: Batch) -> tuple[float | None, Iterable[Batch]]:
        """(recorded checkpoint time to wait for or None, the batches ``batch`` turns into)."""
        if batch.flags & Flag.LAYOUT:
            self._resize(batch)
            return None, [self._numbered(batch.with_(format=PAGES))]
        if batch.flags & Flag.EPOCH_END:
            return batch.meta.get("time"), self._emit_epoch(batch)
        if batch.flags & Flag.END_OF_STREAM:
            return None, [self._numbered(batch.with_(format=PAGES))]
        self._apply(batch)
        return None, ()

    def _resize(self, layout: Batch) -> None:
        """A page image covering the layout; pages of surviving numbers keep their contents."""
        regions = layout.meta["regions"]
        npages = max((r["first_page"] + r["npages"] for r in regions), default=0)
        if npages * layout.page_size > self.max_image:
            raise CorruptData(f"{self.factory_name}: {self.path}: layout of {npages} pages exceeds "
                              f"max-image={self.max_image} bytes")
        if any(int(touched.max()) >= npages for touched in self._touched if touched.size):
            raise CorruptData(f"{self.factory_name}: {self.path}: layout of epoch {layout.epoch} drops pages "
                              f"the open epoch touched")
        image = np.zeros((npages, layout.page_size), dtype=np.uint8)
        if self._image.shape[1] == layout.page_size:
            keep = min(npages, self._image.shape[0])
            image[:keep] = self._image[:keep]
        self._image = image

    def _apply(self, batch: Batch) -> None:
        if batch.format == ENCODED:
            chain = batch.meta["codec"]
            if chain not in self._codecs:
                codec = get_codec(chain)
                if isinstance(codec, EntropyCodec):
                    raise CorruptData(f"{self.factory_name}: {self.path}: epoch {batch.epoch} names codec {chain!r}, "
                                      f"which does not encode pages")
                self._codecs[chain] = codec
            assert batch.payload is not None and batch.offsets is not None   # deframe emits them with ENCODED
            encoded = Encoded(batch.payload, batch.offsets, batch.kinds, chain, batch.meta["raw_size"])
            self._codecs[chain].decode(encoded, self._image, rows=batch.page_numbers)
        else:
            assert batch.data is not None                                    # and data with PAGES
            self._image[batch.page_numbers] = batch.data
        self._touched.append(batch.page_numbers)

    def _emit_epoch(self, marker: Batch) -> Iterator[Batch]:
        touched = np.unique(np.concatenate(self._touched)) if self._touched else np.empty(0, np.uint64)
        self._touched = []
        count = self.context.worker_count
        if count > 1:       # this worker's share: the pages of xor-delta shard worker_index (page % count)
            touched = touched[touched % np.uint64(count) == np.uint64(self.context.worker_index)]
        resync = marker.flags & Flag.RESYNC
        shards = self.context.output_shards     # each batch within one downstream shard: passed on whole
        groups = [touched] if shards == 1 else [touched[touched % np.uint64(shards) == shard] for shard in range(shards)]
        batches = [(group, start) for group in groups for start in range(0, len(group), self.batch_pages)]
        for group, start in batches:
            numbers = group[start:start + self.batch_pages]
            data = self.context.allocate((len(numbers), self._image.shape[1]), np.uint8)  # shared memory if offered
            np.take(self._image, numbers.astype(np.intp), axis=0, out=data)
            yield self._numbered(Batch(format=PAGES, epoch=marker.epoch, flags=resync, page_size=marker.page_size,
                                       stream=marker.stream, page_numbers=numbers,
                                       kinds=np.full(len(numbers), PageKind.NORMAL, dtype=np.uint8), data=data))
        yield self._numbered(marker.with_(format=PAGES, meta={**marker.meta, "pages": len(touched)}))

    def _wait_for(self, recorded: float | None) -> None:
        if self.pace != "recorded" or recorded is None:
            return
        if self._clock is None:
            self._clock = (recorded, time.monotonic())
            return
        delay = (recorded - self._clock[0]) - (time.monotonic() - self._clock[1])
        if delay > 0:
            time.sleep(delay)

    def _numbered(self, batch: Batch) -> Batch:
        batch.sequence = self._sequence
        self._sequence += 1
        return batch


class TraceSourceInto(TraceSource):
    """trace-src running its page consumer (classify, xor-delta, ... as they fuse) in its own process.

    Pages are the biggest flow of a sender chain; replayed into a stage that
    consumes only pages, they never cross a process boundary, as with a
    tracker that encodes what it reads. Built by ``TraceSource.fuse``; the
    consumer travels as (class, property values) so workers can rebuild it.
    """

    factory_name = "trace-src+"
    description = "trace-src with its page consumer fused in (one process, pages never cross a boundary)"

    consumer = Property("object", None, "Set by fusing: (stage class, property values) fed every replayed batch",
                        internal=True)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        if self.consumer is None:
            raise ConfigError(f"{self.factory_name}: built by fusing trace-src with a stage; no consumer= given")
        consumer_class, consumer_properties = self.consumer
        self._consumer: Stage = consumer_class(**consumer_properties)
        setattr(self, "output_caps", self._consumer.output_caps)   # per instance: what the fused consumer emits
        self.fusion = Fusion.join(self, self._consumer)
        self._replayed = self.fusion.link_after(self)

    @classmethod
    def around(cls, source: TraceSource, consumer: Stage) -> "TraceSourceInto":
        return cls(**{**source.property_values(), "consumer": (type(consumer), consumer.property_values())})

    def fuse(self, downstream: Stage) -> Stage | None:
        """Keep fusing while the consumer fuses with its own downstream (classify ! xor-delta ! rle)."""
        fused = self._consumer.fuse(downstream) if downstream.workers == self.workers else None
        return None if fused is None else TraceSourceInto.around(self, fused)

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._consumer.start(context)

    def produce(self) -> Iterator[Batch]:
        for batch in super().produce():
            self._replayed.count(batch)
            yield from self._consumer.handle(batch)

    def stop(self) -> None:
        self._consumer.stop()


def write_trace_from_npz(npz_path: str | Path, trace_path: str | Path, *, epochs: int | None = None,
                         batch_pages: int = 256, interval: float = 0.025) -> int:
    """Convert a recorded memory trace (.npz, see the corpus README) into a trace file; return its epoch count.

    Epoch 1 carries every page of ``base``; epoch k+2 the pages of ``epochNNN`` k.
    Pages travel whole (no codec), zero pages as ZERO entries; each epoch end carries
    the digest the trackers compute and a checkpoint time (seconds from the first
    checkpoint, ``interval`` apart). ``epochs`` limits how many recorded epochs
    after the base are converted. A malformed .npz raises CorruptData.
    """
    with np.load(npz_path) as npz:
        base = _npz_array(npz, "base")
        if base.ndim != 2 or base.dtype != np.uint8:
            raise CorruptData(f"{npz_path}: 'base' is {base.dtype} {base.shape}, expected uint8 (pages, page_size)")
        starts, sizes = _npz_array(npz, "region_starts"), _npz_array(npz, "region_npages")
        if starts.shape != sizes.shape or int(sizes.sum()) != base.shape[0]:
            raise CorruptData(f"{npz_path}: regions of {int(sizes.sum())} pages for {base.shape[0]} base pages")
        first_pages = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        regions = [{"name": f"region{index}", "start": int(start), "first_page": int(first), "npages": int(size)}
                   for index, (start, first, size) in enumerate(zip(starts, first_pages, sizes))]
        recorded = sorted(name[:-len("_pages")] for name in npz.files if name.endswith("_pages"))[:epochs]
        with _TraceWriter(trace_path, base.shape[1], batch_pages) as writer:
            writer.send(Batch.control(Flag.LAYOUT, 1, page_size=base.shape[1], regions=regions))
            writer.epoch(1, np.arange(base.shape[0], dtype=np.uint64), base, time=0.0)
            for epoch, name in enumerate(recorded, start=2):
                writer.epoch(epoch, _npz_array(npz, f"{name}_pages").astype(np.uint64),
                             _npz_array(npz, f"{name}_data"), time=(epoch - 1) * interval)
            writer.send(Batch.control(Flag.END_OF_STREAM, len(recorded) + 1, page_size=base.shape[1]))
    return len(recorded) + 1


def _npz_array(npz, name: str) -> np.ndarray:
    try:
        return npz[name]
    except KeyError:
        raise CorruptData(f"recorded trace has no array {name!r}") from None


class _TraceWriter:
    """Tracker-style batches -> frame -> file-sink, in this process."""

    def __init__(self, path: str | Path, page_size: int, batch_pages: int):
        self.page_size, self.batch_pages = page_size, batch_pages
        self.frame, self.sink = Frame(), FileSink(path=str(path))

    def __enter__(self) -> "_TraceWriter":
        context = StageContext(stage_name="write-trace")
        self.frame.start(context)
        self.sink.start(context)
        return self

    def __exit__(self, *exc_info) -> None:
        self.sink.stop()
        self.frame.stop()

    def send(self, batch: Batch) -> None:
        for framed in self.frame.handle(batch):
            list(self.sink.handle(framed))

    def epoch(self, epoch: int, page_numbers: np.ndarray, data: np.ndarray, *, time: float) -> None:
        if data.shape != (len(page_numbers), self.page_size):
            raise CorruptData(f"trace epoch {epoch}: data shape {data.shape} for {len(page_numbers)} pages")
        data = np.ascontiguousarray(data, dtype=np.uint8)
        for start in range(0, len(page_numbers), self.batch_pages):
            rows = data[start:start + self.batch_pages]
            kinds = np.where(find_zero_pages(rows), PageKind.ZERO, PageKind.NORMAL).astype(np.uint8)
            self.send(Batch(format=PAGES, epoch=epoch, page_size=self.page_size, kinds=kinds, data=rows,
                            page_numbers=page_numbers[start:start + self.batch_pages]))
        self.send(Batch.control(Flag.EPOCH_END, epoch, page_size=self.page_size, pages=len(page_numbers),
                                digest=combine_digests(page_numbers, digest_pages(data)), time=time))
