"""The acknowledgement back channel over real ZeroMQ sockets."""
from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest
import zmq

import zmq.auth

from pipeline.errors import ConfigError, TrackerError, TransportError
from stages.common.acks import AckListener, AckSender, parse_message
from zmtp_peers import ZMTP_NULL_GREETING, ZMTP_READY_PUSH, resident_bytes
from stages.trackers.region import RegionSource, tracked_array


def test_acks_release_waiters_in_epoch_order(curve_keys):
    listener = AckListener("tcp://127.0.0.1:*", **curve_keys.server())
    sender = AckSender(listener.endpoint, **curve_keys.client())
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
        sender.ack(2, stream_id=tracker.stream_id)                                    # handled in order: the resync is in once this is
        assert listener.wait_for(2, timeout=10)
        memory[4096] = 1
        assert tracker.checkpoint().pages == 16          # epoch 3: every page again
        memory[8192] = 1
        threading.Timer(0.05, sender.ack, args=(4,), kwargs={"stream_id": tracker.stream_id}).start()
        assert tracker.checkpoint(wait=True, timeout=10).epoch == 4   # released by the replica's ack


def test_a_discard_notice_fails_the_checkpoint_waiting_for_that_epoch_at_once(tmp_path):
    with attached_tracker(tmp_path) as (memory, tracker, listener, sender):
        tracker.checkpoint()
        sender.ack(1, stream_id=tracker.stream_id)
        assert listener.wait_for(1, timeout=10)
        memory[0] = 1
        threading.Timer(0.05, sender.discarded, args=(2, "torn: the stream ended before its commit record")).start()
        with pytest.raises(TrackerError, match="epoch 2 will never be acknowledged: the receiver discarded it"):
            tracker.checkpoint(wait=True, timeout=60)
        assert listener.counters["discarded"] == 1
        threading.Timer(0.05, sender.ack, args=(3,), kwargs={"stream_id": tracker.stream_id}).start()
        assert tracker.checkpoint(wait=True, timeout=10).epoch == 3   # a later epoch is waited for as usual


def test_malformed_messages_are_counted_and_dropped(tmp_path):
    listener = AckListener(f"ipc://{tmp_path}/acks")
    context = zmq.Context()
    raw = context.socket(zmq.PUSH)
    raw.connect(listener.endpoint)
    try:
        for message in (b"not json", b"x" * 4000, json.dumps({"type": "ack", "epoch": -1}).encode(),
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
    (b'{"type": "ack", "epoch": 1, "stream_id": 7}', "stream_id that is not a string"),
    (b"[" * 4000, "nested too deeply|not an ack"),
    (b'{"type": "ack", "epoch": true}', "valid epoch"),
    (b"\xff\xfe", "codec can't decode|Expecting value|not an ack"),
])
def test_parse_message_says_what_is_wrong(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_message(raw)


def test_unusable_endpoint_is_a_transport_error():
    with pytest.raises(TransportError, match="cannot bind 'tcp://256.0.0.1:1'"):
        AckListener("tcp://256.0.0.1:1", insecure=True)


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


# ---- who may speak ------------------------------------------------------------------

def test_a_tcp_ack_channel_without_keys_is_refused_with_how_to_make_them():
    with pytest.raises(ConfigError, match="unauthenticated and unencrypted: give secret-key=.*authorized-keys=.*"
                                          "pagepipe keygen DIR.*or insecure=true"):
        AckListener("tcp://127.0.0.1:*")
    with pytest.raises(ConfigError, match="server-key="):
        AckSender("tcp://127.0.0.1:5556")


def fake_acks(endpoint: str, context: zmq.Context, **curve) -> zmq.Socket:
    """A PUSH socket (with the given CURVE client settings) that sends an ack of epoch 10**9."""
    push = context.socket(zmq.PUSH)
    push.linger = 0
    for option, value in curve.items():
        setattr(push, option, value)
    push.connect(endpoint)
    push.send(json.dumps({"type": "ack", "epoch": 10 ** 9}).encode(), zmq.NOBLOCK)
    return push


def test_acks_from_peers_without_an_allowed_key_release_nothing(curve_keys):
    """No key, an unknown key, a wrong server key: the fake ack never arrives, so checkpoint(wait=True) holds."""
    listener = AckListener("tcp://127.0.0.1:*", **curve_keys.server())
    stranger_public, stranger_secret = zmq.auth.load_certificate(curve_keys.stranger_secret)
    server_public, _ = zmq.auth.load_certificate(curve_keys.server_public)
    client_public, client_secret = zmq.auth.load_certificate(curve_keys.client_secret)
    context = zmq.Context()
    peers = [fake_acks(listener.endpoint, context),
             fake_acks(listener.endpoint, context, curve_publickey=stranger_public,
                       curve_secretkey=stranger_secret, curve_serverkey=server_public),
             fake_acks(listener.endpoint, context, curve_publickey=client_public, curve_secretkey=client_secret,
                       curve_serverkey=stranger_public)]
    try:
        assert not listener.wait_for(1, timeout=2.0)
        assert listener.acked_epoch == 0 and listener.counters["acks"] == 0
        warnings = " ".join(listener.take_warnings())
        assert "unknown key" in warnings and "failed its handshake" in warnings
    finally:
        for peer in peers:
            peer.close()
        context.term()
        listener.close()


def test_a_fake_ack_does_not_release_checkpoint_wait(curve_keys):
    """The issue's attack: an ack of epoch 10**9 from a peer without an allowed key, or naming no stream
    from the allowed receiver, leaves checkpoint(wait=True) waiting; the real receiver's ack releases it."""
    memory = tracked_array(4 * 4096)
    tracker = RegionSource(regions=memory)
    listener = AckListener("tcp://127.0.0.1:*", **curve_keys.server()).attach(tracker)
    receiver = AckSender(listener.endpoint, **curve_keys.client())
    context = zmq.Context()
    forger = fake_acks(listener.endpoint, context)
    try:
        receiver.ack(10 ** 9)                                          # allowed key, no stream named
        receiver.ack(10 ** 9, stream_id="ab" * 16)                     # allowed key, another stream
        with pytest.raises(TrackerError, match="not acknowledged"):
            tracker.checkpoint(wait=True, timeout=1.5)
        threading.Timer(0.05, receiver.ack, args=(2,), kwargs={"stream_id": tracker.stream_id}).start()
        assert tracker.checkpoint(wait=True, timeout=10).epoch == 2
        assert listener.counters["foreign"] == 2 and listener.acked_epoch == 2
    finally:
        forger.close()
        context.term()
        receiver.close()
        listener.close()
        tracker.stop()


def test_an_ack_naming_another_stream_releases_nothing(curve_keys):
    listener = AckListener("tcp://127.0.0.1:*", stream_id="ab" * 16, **curve_keys.server())
    sender = AckSender(listener.endpoint, **curve_keys.client())
    try:
        sender.ack(7, stream_id="cd" * 16)
        sender.ack(8)                                   # no stream named
        sender.ack(3, stream_id="ab" * 16)
        assert listener.wait_for(3, timeout=10)
        assert not listener.wait_for(4, timeout=0.2)
        assert listener.counters["foreign"] == 2 and listener.acked_epoch == 3
    finally:
        sender.close()
        listener.close()


def test_an_attached_tracker_gives_the_listener_its_stream(tmp_path):
    with attached_tracker(tmp_path) as (memory, tracker, listener, sender):
        assert listener.stream_id == tracker.stream_id and len(tracker.stream_id) == 32
        sender.ack(5, stream_id="00" * 15 + "01")
        sender.ack(1, stream_id=tracker.stream_id)
        assert listener.wait_for(1, timeout=10) and listener.acked_epoch == 1


def test_a_512_mib_ack_message_is_refused_as_announced(curve_keys):
    """The listener's ZMQ_MAXMSGSIZE drops the peer at the frame header: nothing of it is allocated."""
    listener = AckListener("tcp://127.0.0.1:*", insecure=True)
    port = int(listener.endpoint.rsplit(":", 1)[1])
    before = resident_bytes()
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(ZMTP_NULL_GREETING)
            raw.recv(64)
            raw.sendall(ZMTP_READY_PUSH)
            raw.sendall(bytes([0x02]) + (512 << 20).to_bytes(8, "big"))     # a long frame of 512 MiB announced
            with pytest.raises((ConnectionError, OSError)):
                for _ in range(64):                                        # the listener hangs up
                    raw.sendall(bytes(1 << 20))
        assert resident_bytes() - before < 16 << 20
        assert listener.counters["acks"] == 0
    finally:
        listener.close()
