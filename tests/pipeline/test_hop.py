"""Local hops: whole multipart messages both ways over one Unix socket, never blocking, checked as they are read."""
from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from pipeline.errors import CorruptData
from pipeline.hop import CHUNK, Closed, Connection, Listener, connect, encode


def pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a), Connection(b)


def read_all(reader: Connection, writer: Connection | None = None, wanted: int = 1) -> list[list[memoryview]]:
    """Messages from ``reader`` until ``wanted`` have come (flushing ``writer`` between reads)."""
    messages: list[list[memoryview]] = []
    for _ in range(100_000):
        if writer is not None:
            writer.flush()
        messages += reader.receive()
        if len(messages) >= wanted:
            return messages
    raise AssertionError(f"{len(messages)} of {wanted} messages arrived")


def test_messages_of_every_size_arrive_whole_in_order_and_aligned():
    writer, reader = pair()
    big = np.arange(3 * CHUNK // 8, dtype=np.uint64)   # longer than a read: its own buffer
    sent = [[b"one"], [b"", b"x" * 13, memoryview(big).cast("B")], [memoryview(np.arange(5, dtype=np.uint64)).cast("B")],
            [b"tail" * 1000]]
    for frames in sent:
        writer.queue(frames)
    got = read_all(reader, writer, wanted=len(sent))
    assert [[bytes(frame) for frame in frames] for frames in got] == [[bytes(f) for f in frames] for frames in sent]
    for frames in got:
        for frame in frames:
            assert np.frombuffer(frame, np.uint8).ctypes.data % 8 == 0   # arrays viewing them stay aligned
    assert np.array_equal(np.frombuffer(got[1][2], np.uint64), big)


def test_a_message_larger_than_the_socket_takes_waits_in_the_queue_and_completes():
    writer, reader = pair()
    payload = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8)
    assert writer.send([b"head", memoryview(payload)]) is False   # more than the socket buffer: part waits
    assert writer.backlog and writer.queued_bytes > 0
    (message,) = read_all(reader, writer)
    assert not writer.backlog and writer.queued_bytes == 0
    assert bytes(message[0]) == b"head" and np.array_equal(np.frombuffer(message[1], np.uint8), payload)


def test_what_was_written_before_close_arrives_then_closed_even_with_replies_unread():
    writer, reader = pair()
    reader.send([b"credit the writer never reads"])
    for index in range(500):
        writer.queue([bytes([index % 256]) * 100])
    assert writer.flush()
    writer.close()
    got = read_all(reader, wanted=500)
    assert [bytes(frames[0])[0] for frames in got] == [index % 256 for index in range(500)]
    with pytest.raises(Closed):
        reader.receive()
    assert reader.send([b"to nobody"]) is True and reader.unwritable   # dropped: its reader has gone


def test_a_close_in_the_middle_of_a_message_is_corrupt_data():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = Connection(b)
    a.sendall(b"".join(encode([b"x" * 100]))[:50])
    a.close()
    with pytest.raises(CorruptData, match="middle of a message"):
        read_all(reader)


@pytest.mark.parametrize("raw", [
    struct.pack("<II", 12, 1),                                      # body not a multiple of 8
    struct.pack("<II", 8, 1) + struct.pack("<I", 64) + bytes(4),    # frame beyond its message
    struct.pack("<II", 24, 1) + struct.pack("<I", 1) + bytes(20),   # bytes left over
    struct.pack("<II", 8, 5) + bytes(8),                            # more frame lengths than the message holds
])
def test_malformed_messages_are_corrupt_data(raw):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = Connection(b)
    a.sendall(raw)
    with pytest.raises(CorruptData, match="local hop"):
        read_all(reader)
    a.close()


def test_listener_accepts_the_worker_that_connects(tmp_path):
    path = str(tmp_path / "d1.0.0")
    listener = Listener(path)
    assert listener.accept() is None   # nobody yet
    writer = connect(path, check_alive=lambda: None)
    reader = None
    while reader is None:
        reader = listener.accept()
    writer.send([b"hello"])
    assert bytes(read_all(reader)[0][0]) == b"hello"
    writer.close()
    reader.close()
