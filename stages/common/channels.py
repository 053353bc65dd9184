"""Channels: one wire stream spread over several connections and put back in order at the receiver.

``zmq-sink channels=N`` sends the stream's messages round robin over N
connections (so the records and pages of an epoch are spread over all of
them), each message led by a *channel envelope*: a record-shaped header of
type ``CHANNEL_RECORD`` naming the message's index in the stream, the sender's
session, the channel and the message's sequence on that channel
(docs/FORMAT.md, "Channels"). ``zmq-src channels=N`` takes messages off every
connection and hands them on in stream order (``Reassembler``); deframe then
checks the records exactly as for one connection. So an epoch's commit record
passes only after every message before it, from every channel, has: the epoch
barrier across connections. A message lost on any channel (a connection cut
with data in flight) shows as a gap in that channel's sequence or in the
stream's order and fails the stream before the epoch it belongs to can commit;
with ``deframe resume=true`` and the ack channel the restarted receiver then
resyncs as it would after losing its one connection.

Envelopes are untrusted: every field is checked, and a receiver holds at most
``limit`` messages per channel while it waits for another one.

Lanes (``frame workers=N ! zmq-sink channels=N``, received by ``zmq-src
channels=N workers=N ! deframe``): each frame worker frames its share of
every epoch as a stream of its own, a *lane*, that one channel carries from
one sending process to one receiving process; the envelope says so (flag
``ENVELOPE_LANE``), and ``LaneSender`` / ``LaneReceiver`` number its messages.
The epoch barrier is then the runtime's fan-in after the receiving workers:
an epoch passes only once every lane's deframe has checked its commit.
"""
from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import xxhash

from pipeline.errors import ConfigError, CorruptData, TransportError
from pipeline.units import parse_endpoint

from . import wire

CHANNEL_RECORD = next(number for number, name in wire.RESERVED_RECORD_TYPES.items() if name == "CHANNEL")
"""Record type of a channel envelope (0x0006, the number the wire format keeps for channels). It leads a
ZeroMQ message and is stripped by zmq-src: never part of the record stream deframe reads, which refuses it."""
ENVELOPE_END = 1
"""Envelope flag: this channel carries nothing more of the session (every channel gets one at the end)."""
ENVELOPE_LANE = 2
"""Envelope flag: the channel carries a lane, a stream of its own (docs/FORMAT.md, "Lanes"), not messages of a
stream spread over the channels."""
_KNOWN_ENVELOPE_FLAGS = ENVELOPE_END | ENVELOPE_LANE
MAX_CHANNELS = 64
_HEAD = struct.Struct("<HHIQQ")            # type, flags, body length, epoch, message index
_BODY = struct.Struct("<QQHH4x")           # session, sequence on this channel, channel, channel count
_U64 = struct.Struct("<Q")
ENVELOPE_SIZE = wire.RECORD_HEADER_SIZE + _BODY.size   # 56


@dataclass(frozen=True)
class Envelope:
    index: int              # the message's place in the stream; END envelopes: the number of messages sent
    epoch: int              # epoch of the batch the message carries (informative)
    session: int            # chosen at random by each zmq-sink when it starts
    channel_sequence: int   # 0, 1, 2, ... per channel and session: a gap means lost messages
    channel: int
    channels: int
    end: bool = False
    lane: bool = False      # the channel carries lane ``channel`` (its own stream), not spread messages


def encode_envelope(envelope: Envelope) -> bytes:
    """The 56 bytes of an envelope (record header with an xxh3-64 checksum over its first 24 bytes and body)."""
    flags = (ENVELOPE_END if envelope.end else 0) | (ENVELOPE_LANE if envelope.lane else 0)
    head = _HEAD.pack(CHANNEL_RECORD, flags, _BODY.size, envelope.epoch, envelope.index)
    body = _BODY.pack(envelope.session, envelope.channel_sequence, envelope.channel, envelope.channels)
    return head + _U64.pack(xxhash.xxh3_64_intdigest(head + body)) + body


def parse_envelope(data, channel: int, channels: int) -> Envelope:
    """The envelope leading a message received on ``channel`` of ``channels``; CorruptData if anything is off."""
    view = memoryview(data).cast("B")
    where = f"channel {channel} envelope"
    if len(view) != ENVELOPE_SIZE:
        raise CorruptData(f"{where}: {len(view)} bytes, expected {ENVELOPE_SIZE}")
    record_type, flags, length, epoch, index = _HEAD.unpack_from(view)
    if record_type != CHANNEL_RECORD or length != _BODY.size:
        raise CorruptData(f"{where}: record type {record_type:#06x} with a {length}-byte body, expected "
                          f"{CHANNEL_RECORD:#06x} with {_BODY.size} (is the sender using channels={channels}?)")
    hasher = xxhash.xxh3_64(view[:_HEAD.size])
    hasher.update(view[wire.RECORD_HEADER_SIZE:])
    if hasher.intdigest() != _U64.unpack_from(view, _HEAD.size)[0]:
        raise CorruptData(f"{where}: checksum mismatch")
    if flags & ~_KNOWN_ENVELOPE_FLAGS:
        raise CorruptData(f"{where}: unknown flags {flags:#x}")
    session, sequence, sent_channel, sent_channels = _BODY.unpack_from(view, wire.RECORD_HEADER_SIZE)
    if sent_channel != channel or sent_channels != channels:
        raise CorruptData(f"{where}: says channel {sent_channel} of {sent_channels}; this receiver has it as "
                          f"channel {channel} of {channels}")
    return Envelope(index, epoch, session, sequence, channel, channels, bool(flags & ENVELOPE_END),
                    bool(flags & ENVELOPE_LANE))


def channel_endpoints(endpoint: str, channels: int) -> list[str]:
    """One endpoint per channel: a comma-separated list as given, else ``tcp://host:P`` -> ports P, P+1, ...
    and ``ipc://path`` -> path, path.1, path.2, ..."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise ConfigError(f"channels={channels}: use 1 to {MAX_CHANNELS}")
    if "," in endpoint:
        listed = [parse_endpoint(part.strip()) for part in endpoint.split(",")]
        if len(listed) != channels:
            raise ConfigError(f"endpoint lists {len(listed)} endpoints for channels={channels}")
        return listed
    endpoint = parse_endpoint(endpoint)
    if channels == 1:
        return [endpoint]
    if endpoint.startswith("ipc://"):
        return [endpoint] + [f"{endpoint}.{channel}" for channel in range(1, channels)]
    host, _, port = endpoint.rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit() or int(port) + channels - 1 > 65535:
        raise ConfigError(f"endpoint {endpoint!r}: channels={channels} needs tcp://host:port (ports port to "
                          f"port+{channels - 1}), ipc://path, or a comma-separated list of {channels} endpoints")
    return [f"{host}:{int(port) + channel}" for channel in range(channels)]


class Spreader:
    """The sender's side: which channel each message takes, and its envelope."""

    def __init__(self, channels: int):
        self.channels = channels
        self.session = int.from_bytes(os.urandom(8), "little")
        self._index = 0
        self._sequences = [0] * channels

    def next(self, epoch: int) -> tuple[int, bytes]:
        """(channel, envelope) for the stream's next message."""
        channel = self._index % self.channels
        envelope = self._envelope(channel, epoch, end=False)
        self._index += 1
        return channel, envelope

    def ends(self) -> list[bytes]:
        """The END envelope of each channel, in channel order."""
        return [self._envelope(channel, 0, end=True) for channel in range(self.channels)]

    def _envelope(self, channel: int, epoch: int, end: bool) -> bytes:
        sequence = self._sequences[channel]
        self._sequences[channel] += 1
        return encode_envelope(Envelope(self._index, epoch, self.session, sequence, channel, self.channels, end))


END = object()
"""What ``Reassembler.ready`` yields once every channel has ended the session."""


class Reassembler:
    """The receiver's side: messages from each channel in, the stream's messages out in order.

    ``push`` a checked envelope and its payload; ``ready`` yields the payloads
    that are next in stream order (and ``END``). A message that can no longer
    arrive (its channel's sequence jumped, or every channel is past it) is a
    TransportError. A new session (a restarted sender) drops what is left of
    the old one, as a new connection would; messages of a session already
    replaced are dropped too. A receiver that joins a running session (its
    first message is not the session's first) tolerates gaps until a payload
    for which ``starts_segment`` holds has passed (deframe resume=true skips
    everything before it). ``wants(channel)`` says whether to read more from
    a channel (at most ``limit`` messages wait per channel).
    """

    def __init__(self, channels: int, limit: int, starts_segment: Callable[[Any], bool] | None = None):
        self.channels = channels
        self.limit = limit
        self.starts_segment = starts_segment
        self._anchored = starts_segment is None  # False until a session's start is seen, or (joined a running
        #                                          session) until a segment starts: gaps before are tolerated
        self.session: int | None = None
        self._retired: set[int] = set()
        self._queues: list[deque[tuple[Envelope, object]]] = [deque() for _ in range(channels)]
        self._sequences: list[int | None] = [None] * channels
        self._next: int | None = None
        self.dropped = 0

    def wants(self, channel: int) -> bool:
        return len(self._queues[channel]) < self.limit

    def push(self, envelope: Envelope, payload) -> None:
        if envelope.lane:
            raise CorruptData(f"channel {envelope.channel}: carries lane {envelope.channel} of a stream framed by "
                              f"{envelope.channels} frame workers; receive it with zmq-src channels="
                              f"{envelope.channels} workers={envelope.channels} (each worker deframes one lane)")
        if envelope.session in self._retired:
            self.dropped += 1
            return
        if self.session is None:
            self.session = envelope.session
        elif envelope.session != self.session:
            self._restart(envelope.session)
        channel = envelope.channel
        expected = self._sequences[channel]
        if expected is not None and envelope.channel_sequence != expected and self._anchored:
            raise TransportError(f"channel {channel}: message #{envelope.channel_sequence} arrived where #{expected} "
                                 f"was next; {envelope.channel_sequence - expected} message(s) of the stream were "
                                 f"lost on this connection (cut while data was in flight)")
        self._sequences[channel] = envelope.channel_sequence + 1
        queue = self._queues[channel]
        if queue and envelope.index < queue[-1][0].index + (0 if envelope.end else 1) and self._anchored:
            raise CorruptData(f"channel {channel}: message index {envelope.index} after {queue[-1][0].index}")
        queue.append((envelope, payload))

    def _restart(self, session: int) -> None:
        if self.session is not None:  # called on a session change: there is an old one
            self._retired.add(self.session)
        self.dropped += sum(len(queue) for queue in self._queues)
        self.session = session
        self._queues = [deque() for _ in range(self.channels)]
        self._sequences = [None] * self.channels
        self._next = None
        self._anchored = self.starts_segment is None

    def ready(self):
        """Payloads next in stream order, then ``END`` once every channel has ended at the same index."""
        queues = self._queues
        while True:
            heads = [queue[0][0] if queue else None for queue in queues]
            if self._next is None:
                if any(head is not None and head.index == 0 and not head.end for head in heads):
                    self._next = 0          # a session seen from its start
                    self._anchored = True
                elif all(head is not None for head in heads):
                    self._next = min(head.index for head in heads if head is not None)   # joined a running session
                    self._anchored = self.starts_segment is None
                else:
                    return
            for channel, head in enumerate(heads):
                if head is not None and head.index == self._next and not head.end:
                    payload = queues[channel].popleft()[1]
                    if not self._anchored and self.starts_segment is not None and self.starts_segment(payload):
                        self._anchored = True   # from here on the stream must be whole
                    yield payload
                    self._next += 1
                    break
            else:
                present = [head for head in heads if head is not None]
                if len(present) < len(heads):
                    return                  # the next message may still come on a channel that has none waiting
                if all(head.end and head.index == self._next for head in present):
                    for queue in queues:
                        queue.popleft()
                    self._sequences = [None] * self.channels
                    yield END
                    return
                if not self._anchored:  # joined mid-stream: what came before the next segment is skipped anyway
                    self.dropped += min(head.index for head in present) - self._next
                    self._next = min(head.index for head in present)
                    continue
                raise TransportError(f"message {self._next} of the stream was lost: every channel has moved past it "
                                     f"(heads at {[head.index for head in present]})")


class LaneSender:
    """The sending side of one lane: the envelope of each message channel ``lane`` carries (docs/FORMAT.md,
    "Lanes"); message index and channel sequence are the same count, from 0 at the sender's start."""

    def __init__(self, lane: int, lanes: int):
        self.lane, self.lanes = lane, lanes
        self.session = int.from_bytes(os.urandom(8), "little")
        self._sequence = 0

    def next(self, epoch: int, end: bool = False) -> bytes:
        """The envelope of the lane's next message (``end``: the empty message that ends the lane)."""
        sequence = self._sequence
        self._sequence += 1
        return encode_envelope(Envelope(sequence, epoch, self.session, sequence, self.lane, self.lanes, end,
                                        lane=True))


class LaneReceiver:
    """The receiving side of one lane: checks each message's envelope and that no message is missing.

    A new session (a restarted sender) starts over: deframe then sees its stream header, as on one
    connection. A gap in a session's sequence (a connection cut with messages in flight) is a
    TransportError, before deframe could take the epoch the lost message belonged to. Messages of a
    session already replaced are dropped (``dropped``).
    """

    def __init__(self, lane: int, lanes: int):
        self.lane, self.lanes = lane, lanes
        self.session: int | None = None
        self._next = 0
        self._retired: set[int] = set()
        self.dropped = 0

    def accept(self, envelope_bytes) -> Envelope | None:
        """The checked envelope of a message, or None when the message is to be dropped (an old session's)."""
        envelope = parse_envelope(envelope_bytes, self.lane, self.lanes)
        if not envelope.lane:
            raise CorruptData(f"channel {self.lane}: a message of a stream spread over {self.lanes} channels by one "
                              f"frame worker; receive it with zmq-src channels={self.lanes} workers=1")
        if envelope.index != envelope.channel_sequence:
            raise CorruptData(f"channel {self.lane}: lane message index {envelope.index} differs from its channel "
                              f"sequence {envelope.channel_sequence}")
        if envelope.session in self._retired:
            self.dropped += 1
            return None
        if envelope.session != self.session:
            if self.session is not None:
                self._retired.add(self.session)
            self.session = envelope.session    # a sender's start, or a receiver joining a running lane
        elif envelope.channel_sequence != self._next:
            raise TransportError(f"channel {self.lane}: message #{envelope.channel_sequence} arrived where "
                                 f"#{self._next} was next; {envelope.channel_sequence - self._next} message(s) of "
                                 f"lane {self.lane} were lost on this connection (cut while data was in flight)")
        self._next = envelope.channel_sequence + 1
        return envelope
