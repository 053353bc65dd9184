"""Channel envelopes and the receiver's reassembly: order across channels, lost messages, sessions, endpoints."""
from __future__ import annotations

import random

import pytest
import xxhash

from pipeline.errors import ConfigError, CorruptData, TransportError
from stages.common.channels import (CHANNEL_RECORD, END, ENVELOPE_SIZE, Envelope, LaneReceiver, LaneSender, Reassembler,
                                    Spreader, channel_endpoints, encode_envelope, parse_envelope)


def spread(messages: list[bytes], channels: int) -> list[list[tuple[Envelope, bytes]]]:
    """What each channel carries for ``messages`` (then the ends), as the receiver parses it."""
    spreader = Spreader(channels)
    per_channel: list[list[tuple[Envelope, bytes]]] = [[] for _ in range(channels)]
    for epoch, message in enumerate(messages):
        channel, raw = spreader.next(epoch)
        per_channel[channel].append((parse_envelope(raw, channel, channels), message))
    for channel, raw in enumerate(spreader.ends()):
        per_channel[channel].append((parse_envelope(raw, channel, channels), b""))
    return per_channel


def drain(reassembler: Reassembler) -> list:
    return list(reassembler.ready())


def test_envelope_round_trips_and_is_record_shaped():
    envelope = Envelope(index=7, epoch=3, session=0xABCDEF, channel_sequence=2, channel=1, channels=4)
    raw = encode_envelope(envelope)
    assert len(raw) == ENVELOPE_SIZE == 56
    assert int.from_bytes(raw[:2], "little") == CHANNEL_RECORD
    assert parse_envelope(raw, 1, 4) == envelope
    assert parse_envelope(encode_envelope(Envelope(9, 0, 1, 3, 1, 4, end=True)), 1, 4).end


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:-1], "55 bytes"),
    (lambda raw: b"\x03\x00" + raw[2:], "record type 0x0003"),
    (lambda raw: raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], "checksum mismatch"),
    (lambda raw: raw[:24] + bytes(8) + raw[32:], "checksum mismatch"),
])
def test_damaged_envelopes_are_corrupt_data(damage, message):
    raw = encode_envelope(Envelope(1, 1, 5, 0, 0, 2))
    with pytest.raises(CorruptData, match=message):
        parse_envelope(damage(raw), 0, 2)


def test_an_envelope_for_another_channel_or_channel_count_is_refused():
    raw = encode_envelope(Envelope(1, 1, 5, 0, 1, 3))
    with pytest.raises(CorruptData, match="says channel 1 of 3; this receiver has it as channel 0 of 3"):
        parse_envelope(raw, 0, 3)
    with pytest.raises(CorruptData, match="channel 1 of 2"):
        parse_envelope(raw, 1, 2)


@pytest.mark.parametrize("channels", [2, 3, 5])
def test_messages_arriving_in_any_interleaving_come_out_in_stream_order(channels):
    messages = [f"message {i}".encode() for i in range(23)]
    per_channel = spread(messages, channels)
    rng = random.Random(channels)
    reassembler, out = Reassembler(channels, limit=1000), []
    cursors = [0] * channels
    while any(cursor < len(items) for cursor, items in zip(cursors, per_channel)):
        channel = rng.choice([c for c in range(channels) if cursors[c] < len(per_channel[c])])
        reassembler.push(*per_channel[channel][cursors[channel]])
        cursors[channel] += 1
        out += drain(reassembler)
    assert out == messages + [END]


def test_the_end_waits_for_every_channel():
    per_channel = spread([b"a", b"b", b"c"], 3)
    reassembler = Reassembler(3, limit=10)
    for channel in (0, 1):
        for item in per_channel[channel]:
            reassembler.push(*item)
    assert drain(reassembler) == [b"a", b"b"]          # c travels on channel 2
    reassembler.push(*per_channel[2][0])
    assert drain(reassembler) == [b"c"]                 # channel 2 has not ended yet
    reassembler.push(*per_channel[2][1])
    assert drain(reassembler) == [END]


def test_a_gap_in_one_channel_is_a_transport_error_naming_it():
    per_channel = spread([bytes([i]) for i in range(9)], 3)
    reassembler = Reassembler(3, limit=10)
    reassembler.push(*per_channel[1][0])
    with pytest.raises(TransportError, match=r"channel 1: message #2 arrived where #1 was next; 1 message"):
        reassembler.push(*per_channel[1][2])


def test_a_message_every_channel_has_moved_past_is_lost():
    per_channel = spread([bytes([i]) for i in range(6)], 2)
    reassembler = Reassembler(2, limit=10)
    reassembler.push(*per_channel[0][0])
    assert drain(reassembler) == [b"\x00"]
    # the receiver joined channel 1 late: its first message is #1 of that channel (stream index 3)
    reassembler.push(*per_channel[0][1])
    reassembler.push(*per_channel[1][1])
    with pytest.raises(TransportError, match="message 1 of the stream was lost"):
        drain(reassembler)


def test_a_receiver_joining_a_running_session_starts_where_every_channel_has_delivered():
    per_channel = spread([bytes([i]) for i in range(10)], 2)
    reassembler = Reassembler(2, limit=10)
    reassembler.push(*per_channel[1][2])                # index 5
    assert drain(reassembler) == []                     # channel 0 not heard yet
    reassembler.push(*per_channel[0][3])                # index 6
    assert drain(reassembler) == [b"\x05", b"\x06"]


def test_a_new_session_drops_what_is_left_of_the_old_one_and_stragglers_of_it():
    old = spread([b"o0", b"o1", b"o2", b"o3"], 2)
    new = spread([b"n0", b"n1"], 2)
    reassembler = Reassembler(2, limit=10)
    reassembler.push(*old[0][0])
    assert drain(reassembler) == [b"o0"]
    reassembler.push(*old[0][1])                        # o2: waits for o1 on channel 1, which never comes
    reassembler.push(*new[0][0])                        # the sender restarted
    reassembler.push(*old[1][0])                        # a straggler of the old session
    for item in new[1] + new[0][1:]:
        reassembler.push(*item)
    assert drain(reassembler) == [b"n0", b"n1", END]
    assert reassembler.dropped == 2


def test_wants_bounds_what_waits_per_channel():
    per_channel = spread([bytes([i]) for i in range(8)], 2)
    reassembler = Reassembler(2, limit=2)
    for item in per_channel[1][:2]:
        reassembler.push(*item)
    assert not reassembler.wants(1) and reassembler.wants(0)


def test_channel_endpoints():
    assert channel_endpoints("tcp://10.0.0.1:5555", 3) == ["tcp://10.0.0.1:5555", "tcp://10.0.0.1:5556",
                                                           "tcp://10.0.0.1:5557"]
    assert channel_endpoints("ipc:///run/pp", 2) == ["ipc:///run/pp", "ipc:///run/pp.1"]
    assert channel_endpoints("tcp://a:1, tcp://b:2", 2) == ["tcp://a:1", "tcp://b:2"]
    assert channel_endpoints("tcp://*:5555", 1) == ["tcp://*:5555"]
    for endpoint, channels in (("tcp://a:1,tcp://b:2", 3), ("tcp://*:*", 2), ("tcp://a:65535", 2), ("tcp://a:1", 0)):
        with pytest.raises(ConfigError):
            channel_endpoints(endpoint, channels)


def test_a_receiver_joining_midway_skips_gaps_until_a_segment_starts_then_is_strict():
    messages = [b"r0", b"r1", b"r2", b"r3", b"SEG", b"r5", b"r6", b"r7", b"r8", b"r9"]
    per_channel = spread(messages, 2)                   # channel 0: indices 0, 2, 4, ...; channel 1: 1, 3, 5, ...
    reassembler = Reassembler(2, limit=10, starts_segment=lambda payload: payload.startswith(b"SEG"))
    reassembler.push(*per_channel[1][0])                # index 1 (index 0 went to the receiver before)
    reassembler.push(*per_channel[0][1])                # index 2
    reassembler.push(*per_channel[1][2])                # index 5: index 3 was lost, before the segment starts
    reassembler.push(*per_channel[0][2])                # index 4, the segment start
    assert drain(reassembler) == [b"r1", b"r2", b"SEG", b"r5"]
    assert reassembler.dropped == 1
    with pytest.raises(TransportError, match="channel 0"):
        reassembler.push(*per_channel[0][4])            # after the segment start a gap fails the stream


# ---- lanes: one stream per channel ---------------------------------------------------------

def test_lane_envelopes_number_each_lanes_messages_and_say_they_carry_a_lane():
    sender = LaneSender(1, 3)
    raws = [sender.next(epoch) for epoch in (4, 4, 5)] + [sender.next(5, end=True)]
    parsed = [parse_envelope(raw, 1, 3) for raw in raws]
    assert [(e.index, e.channel_sequence, e.lane, e.end) for e in parsed] == \
        [(0, 0, True, False), (1, 1, True, False), (2, 2, True, False), (3, 3, True, True)]
    receiver = LaneReceiver(1, 3)
    assert [receiver.accept(raw).index for raw in raws] == [0, 1, 2, 3]


def test_a_lost_lane_message_is_a_transport_error():
    sender, receiver = LaneSender(0, 2), LaneReceiver(0, 2)
    receiver.accept(sender.next(1))
    sender.next(1)                                  # lost on the connection
    with pytest.raises(TransportError, match=r"channel 0: message #2 arrived where #1 was next; 1 message\(s\) of "
                                             r"lane 0 were lost"):
        receiver.accept(sender.next(1))


def test_a_restarted_lane_sender_starts_over_and_its_predecessor_is_dropped():
    old, new, receiver = LaneSender(0, 2), LaneSender(0, 2), LaneReceiver(0, 2)
    receiver.accept(old.next(1))
    late = old.next(1)
    assert receiver.accept(new.next(1)).session == new.session      # a new session: deframe sees its header
    assert receiver.accept(late) is None and receiver.dropped == 1   # the replaced session's stragglers
    assert receiver.accept(new.next(2)).index == 1


def test_lanes_and_a_spread_stream_refuse_each_other_naming_the_setting():
    spread_envelope = Spreader(2).next(1)[1]
    with pytest.raises(CorruptData, match="spread over 2 channels by one frame worker; receive it with "
                                          "zmq-src channels=2 workers=1"):
        LaneReceiver(0, 2).accept(spread_envelope)
    lane = parse_envelope(LaneSender(0, 2).next(1), 0, 2)
    with pytest.raises(CorruptData, match="carries lane 0 of a stream framed by 2 frame workers; receive it with "
                                          "zmq-src channels=2 workers=2"):
        Reassembler(2, limit=4).push(lane, b"payload")


def test_a_lane_envelope_whose_index_is_not_its_sequence_is_corrupt():
    raw = encode_envelope(Envelope(index=5, epoch=1, session=9, channel_sequence=0, channel=0, channels=2, lane=True))
    with pytest.raises(CorruptData, match="lane message index 5 differs from its channel sequence 0"):
        LaneReceiver(0, 2).accept(raw)


def test_unknown_envelope_flags_are_still_refused():
    raw = bytearray(encode_envelope(Envelope(0, 1, 9, 0, 0, 2, lane=True)))
    raw[2] |= 4                                             # a flag this version does not know, checksum redone
    raw[24:32] = xxhash.xxh3_64_intdigest(bytes(raw[:24]) + bytes(raw[32:])).to_bytes(8, "little")
    with pytest.raises(CorruptData, match="unknown flags 0x6"):
        parse_envelope(bytes(raw), 0, 2)
