"""The acknowledgement back channel over real ZeroMQ sockets."""
from __future__ import annotations

import contextlib
import json
import threading

import pytest
import zmq

from pipeline.errors import TrackerError, TransportError
from stages.common.acks import AckListener, AckSender, parse_message
from stages.trackers.region import RegionSource, tracked_array


def test_acks_release_waiters_in_epoch_order():
    listener = AckListener("tcp://127.0.0.1:*")
    sender = AckSender(listener.endpoint)
    try:
        assert listener.endpoint.startswith("tcp://127.0.0.1:")
        for epoch in range(1, 6):
            assert sender.ack(epoch, stream=0)
        assert listener.wait_for(5, timeout=10)
        assert listener.acked_epoch == 5
        assert sorted(listener.ack_times) == [1, 2, 3, 4, 5]
        assert listener.counters["acks"] == 5
    finally:
        sender.close()
        listener.close()


def test_wait_for_times_out_without_ack(tmp_path):
    listener = AckListener(f"ipc://{tmp_path}/acks")
    try:
        assert listener.wait_for(1, timeout=0.05) is False
    finally:
        listener.close()


def test_resync_request_sent_before_listener_exists_is_delivered(tmp_path):
    endpoint = f"ipc://{tmp_path}/acks"
    sender = AckSender(endpoint)
    assert sender.request_resync("replica empty", epoch=0)
    reasons: list[str] = []
    arrived = threading.Event()
    listener = AckListener(endpoint, on_resync=lambda reason: (reasons.append(reason), arrived.set()))
    try:
        assert arrived.wait(timeout=10)
        assert reasons == ["replica empty"]
    finally:
        sender.close()
        listener.close()


@contextlib.contextmanager
def attached_tracker(tmp_path):
    """A region-src over 16 pages with an AckListener attached, and the receiver's AckSender talking to it."""
    memory = tracked_array(16 * 4096)
    tracker = RegionSource(regions=memory)
    listener = AckListener(f"ipc://{tmp_path}/acks").attach(tracker)
    sender = AckSender(listener.endpoint)
    try:
        yield memory, tracker, listener, sender
    finally:
        sender.close()
        listener.close()
        tracker.stop()


def test_acks_and_resync_requests_reach_an_attached_region_tracker(tmp_path):
    with attached_tracker(tmp_path) as (memory, tracker, listener, sender):
        assert tracker.checkpoint().pages == 16          # epoch 1: every page
        memory[0] = 1
        assert tracker.checkpoint().pages == 1           # epoch 2: the written page
        sender.request_resync("replica lost")
        sender.ack(2)                                    # handled in order: the resync is in once this is
        assert listener.wait_for(2, timeout=10)
        memory[4096] = 1
        assert tracker.checkpoint().pages == 16          # epoch 3: every page again
        memory[8192] = 1
        threading.Timer(0.05, sender.ack, args=(4,)).start()
        assert tracker.checkpoint(wait=True, timeout=10).epoch == 4   # released by the replica's ack


def test_a_discard_notice_fails_the_checkpoint_waiting_for_that_epoch_at_once(tmp_path):
    with attached_tracker(tmp_path) as (memory, tracker, listener, sender):
        tracker.checkpoint()
        sender.ack(1)
        assert listener.wait_for(1, timeout=10)
        memory[0] = 1
        threading.Timer(0.05, sender.discarded, args=(2, "torn: the stream ended before its commit record")).start()
        with pytest.raises(TrackerError, match="epoch 2 will never be acknowledged: the receiver discarded it"):
            tracker.checkpoint(wait=True, timeout=60)
        assert listener.counters["discarded"] == 1
        threading.Timer(0.05, sender.ack, args=(3,)).start()
        assert tracker.checkpoint(wait=True, timeout=10).epoch == 3   # a later epoch is waited for as usual


def test_malformed_messages_are_counted_and_dropped(tmp_path):
    listener = AckListener(f"ipc://{tmp_path}/acks")
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.connect(listener.endpoint)
    try:
        for message in (b"not json", b"x" * 10000, json.dumps({"type": "ack", "epoch": -1}).encode(),
                        json.dumps({"type": "ack"}).encode(), json.dumps([1, 2]).encode(),
                        json.dumps({"type": "launch-missiles"}).encode()):
            raw.send(message)
        raw.send(json.dumps({"type": "ack", "epoch": 3}).encode())
        assert listener.wait_for(3, timeout=10)
        assert listener.counters["malformed"] == 6
    finally:
        raw.close(linger=0)
        context.term()
        listener.close()


@pytest.mark.parametrize("raw, message", [
    (b"{}", "not an ack, resync or discarded"),
    (b'{"type": "discarded", "reason": "torn"}', "discarded without a valid epoch"),
    (b'{"type": "ack", "epoch": "7"}', "valid epoch"),
    (b"y" * 5000, "exceeds the limit"),
    (b"[" * 4000, "nested too deeply|not an ack"),
    (b'{"type": "ack", "epoch": true}', "valid epoch"),
    (b"\xff\xfe", "codec can't decode|Expecting value|not an ack"),
])
def test_parse_message_says_what_is_wrong(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_message(raw)


def test_unusable_endpoint_is_a_transport_error():
    with pytest.raises(TransportError, match="cannot bind 'tcp://256.0.0.1:1'"):
        AckListener("tcp://256.0.0.1:1")


def test_resync_request_releases_waiters_until_the_next_ack(tmp_path):
    listener = AckListener(f"ipc://{tmp_path}/acks")
    sender = AckSender(listener.endpoint)
    try:
        sender.ack(3)
        assert listener.wait_for(3, timeout=10)
        sender.request_resync("digest mismatch", epoch=3)
        assert listener.wait_for(9, timeout=10, or_resync=True)     # epochs 4..8 were discarded
        assert listener.resync_pending and listener.acked_epoch == 3
        assert not listener.wait_for(9, timeout=0.01)               # without or_resync it still waits
        sender.ack(9)                                               # the resync epoch is committed
        assert listener.wait_for(9, timeout=10)
        assert not listener.resync_pending
    finally:
        sender.close()
        listener.close()
