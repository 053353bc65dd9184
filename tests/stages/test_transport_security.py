"""CurveZMQ and resource bounds of zmq-src / zmq-sink over real sockets, raw hostile peers and processes."""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.batch import STREAM, Batch, Flag
from pipeline.errors import ConfigError, TransportError
from pipeline.stage import StageContext
from stages.transport import ZmqSink, ZmqSource
from zmtp_peers import announce_and_send, resident_bytes

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def free_tcp_endpoint() -> str:
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


class Posted:
    """A StageContext whose bus warnings are kept."""

    def __init__(self, name: str):
        self.warnings: list[str] = []
        self.context = StageContext(name, post=lambda kind, **fields: self.warnings.append(fields.get("message", "")))


def started(stage, posted: Posted | None = None):
    stage.start(posted.context if posted else StageContext(stage.factory_name))
    return stage


def send_and_end(sink: ZmqSink, data: bytes) -> None:
    list(sink.handle(Batch(format=STREAM, payload=np.frombuffer(data, np.uint8))))
    list(sink.handle(Batch.control(Flag.END_OF_STREAM, 0, format=STREAM)))


# ---- keys ---------------------------------------------------------------------------

def test_an_allowed_key_gets_through_encrypted(curve_keys):
    endpoint = free_tcp_endpoint()
    source = started(ZmqSource(endpoint=endpoint, timeout="20s", **curve_keys.server()))
    sink = started(ZmqSink(endpoint=endpoint, timeout="20s", **curve_keys.client()))
    try:
        with ThreadPoolExecutor(1) as sending:   # zmq-sink waits at the end until the receiver closes
            sent = sending.submit(send_and_end, sink, b"checkpoint bytes")
            received = list(source.produce())
            sent.result()
    finally:
        sink.stop()
        source.stop()
    assert b"".join(b.payload.tobytes() for b in received[:-1]) == b"checkpoint bytes"
    assert source.counters["peers_admitted"] >= 1 and source.counters["peers_refused"] == 0


@pytest.mark.parametrize("peer", ["unknown key", "no key", "wrong server key"])
def test_a_peer_without_the_right_keys_is_refused_and_never_read(curve_keys, peer):
    endpoint, posted = free_tcp_endpoint(), Posted("zmq-src")
    source = started(ZmqSource(endpoint=endpoint, timeout="1500ms", **curve_keys.server()), posted)
    keys = {"unknown key": {"secret_key": curve_keys.stranger_secret, "server_key": curve_keys.server_public},
            "no key": {"insecure": True},
            "wrong server key": {"secret_key": curve_keys.client_secret, "server_key": curve_keys.stranger_public},
            }[peer]
    sink = started(ZmqSink(endpoint=endpoint, timeout="1s", **keys))
    try:
        with pytest.raises(TransportError, match="no receiver took data"):
            send_and_end(sink, b"injected epoch")
        with pytest.raises(TransportError, match="nothing received"):
            list(source.produce())
    finally:
        sink.stop()
        source.stop()
    assert source.counters["messages"] == 0 and source.counters["peers_admitted"] == 0
    expected = "refused a peer at 127.0.0.1: unknown key" if peer == "unknown key" else "failed its handshake"
    assert len([warning for warning in posted.warnings if expected in warning]) == 1, posted.warnings
    refusals = source.counters["peers_refused"] + source.counters["handshakes_failed"]
    assert refusals >= 1   # the sink keeps reconnecting; the bus hears of it once per 10 s


@pytest.mark.parametrize("bind, properties, message", [
    (True, {}, "unauthenticated and unencrypted: give secret-key=.* authorized-keys=.*pagepipe keygen DIR.*insecure=true"),
    (False, {}, "give secret-key=.* server-key=.*pagepipe keygen DIR"),
    (True, {"insecure": True, "secret_key": "x"}, "contradict"),
    (True, {"server_key": "x"}, "without secret-key="),
    (True, {"secret_key": "/nonexistent/key_secret", "authorized_keys": "/tmp"}, "cannot read a key from"),
])
def test_key_settings_are_checked_before_any_socket_opens(bind, properties, message):
    stage = ZmqSource(endpoint="tcp://127.0.0.1:1", bind=bind, **properties)
    with pytest.raises(ConfigError, match=message):
        started(stage)


def test_role_mismatches_say_which_property_belongs_where(curve_keys):
    with pytest.raises(ConfigError, match="server-key= is for the end that connects"):
        started(ZmqSource(endpoint="tcp://127.0.0.1:1", secret_key=curve_keys.server_secret,
                          server_key=curve_keys.client_public))
    with pytest.raises(ConfigError, match="authorized-keys= is for the end that binds"):
        started(ZmqSink(endpoint="tcp://127.0.0.1:1", secret_key=curve_keys.client_secret,
                        authorized_keys=curve_keys.allowed))
    with pytest.raises(ConfigError, match="holds no secret key"):
        started(ZmqSink(endpoint="tcp://127.0.0.1:1", secret_key=curve_keys.client_public,
                        server_key=curve_keys.server_public))
    with pytest.raises(ConfigError, match="not the public half"):
        started(ZmqSink(endpoint="tcp://127.0.0.1:1", secret_key=curve_keys.client_secret,
                        public_key=curve_keys.stranger_public, server_key=curve_keys.server_public))


def test_ipc_links_need_no_keys(tmp_path):
    started(ZmqSource(endpoint=f"ipc://{tmp_path}/private.ipc")).stop()


# ---- bounded memory -----------------------------------------------------------------

def settle(source: ZmqSource, seconds: float = 1.0) -> None:
    """Let the I/O threads take what the peers sent."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        source._socket.poll(50)


@pytest.mark.parametrize("mechanism", [b"NULL", b"CURVE"])
def test_peers_announcing_255_mib_are_dropped_at_the_header(curve_keys, mechanism):
    """4 raw peers each announce a 255 MiB frame and try to send half: refused as announced (max-message)."""
    endpoint = free_tcp_endpoint()
    keys = {"insecure": True} if mechanism == b"NULL" else curve_keys.server()
    source = started(ZmqSource(endpoint=endpoint, timeout="10s", **keys))
    peers = []
    try:
        settle(source, 0.2)
        idle = resident_bytes()
        peers = [announce_and_send(port_of(endpoint), 255 * MiB, 128 * MiB, mechanism=mechanism) for _ in range(4)]
        settle(source)
        grown = resident_bytes() - idle
    finally:
        for peer in peers:
            if peer is not None:
                peer.close()
        source.stop()
    assert peers == [None] * 4, "the receiver kept reading a peer past its max-message"
    assert grown < 64 * MiB, f"receiver grew by {grown / MiB:.0f} MiB"


def test_connections_beyond_the_limit_are_dropped_before_their_handshake():
    """64 raw peers each send all but one byte of a frame of max-message: only max-connections are held."""
    endpoint, posted = free_tcp_endpoint(), Posted("zmq-src")
    source = started(ZmqSource(endpoint=endpoint, timeout="10s", insecure=True, max_connections=4), posted)
    peers = []
    try:
        settle(source, 0.2)
        idle = resident_bytes()
        for _ in range(64):
            peers.append(announce_and_send(port_of(endpoint), MiB, MiB - 1))
            settle(source, 0.02)
        settle(source)
        grown = resident_bytes() - idle
        source._post_refusals()
    finally:
        for peer in peers:
            if peer is not None:
                peer.close()
        source.stop()
    assert source.counters["connections_dropped"] >= 60
    assert grown < 16 * MiB, f"receiver grew by {grown / MiB:.0f} MiB"
    assert any("already 4 connections (max-connections)" in warning for warning in posted.warnings)


# ---- across processes ---------------------------------------------------------------

def pagepipe_stage(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", *arguments], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sender_key", ["client", "stranger", "no key", "wrong server key"])
def test_pagepipe_stage_processes_link_with_keys_and_refuse_every_other_peer(tmp_path, curve_keys, sender_key):
    """zmq-src and zmq-sink as two `pagepipe stage` processes; the test feeds the sink and reads the source."""
    endpoint = free_tcp_endpoint()
    sender_keys = {"client": [f"secret-key={curve_keys.client_secret}", f"server-key={curve_keys.server_public}"],
                   "stranger": [f"secret-key={curve_keys.stranger_secret}", f"server-key={curve_keys.server_public}"],
                   "no key": ["insecure=true"],
                   "wrong server key": [f"secret-key={curve_keys.client_secret}",
                                        f"server-key={curve_keys.stranger_public}"]}[sender_key]
    into_sink, out_of_source = f"ipc://{tmp_path}/in.ipc", f"ipc://{tmp_path}/out.ipc"
    with zmq.Context() as context, context.socket(zmq.PUSH) as push, context.socket(zmq.PULL) as pull:
        push.linger = pull.linger = 0
        pull.bind(out_of_source)
        push.bind(into_sink)
        receiver = pagepipe_stage("zmq-src", f"endpoint={endpoint}", "timeout=4s",
                                  f"secret-key={curve_keys.server_secret}", f"authorized-keys={curve_keys.allowed}",
                                  "--output", out_of_source)
        sender = pagepipe_stage("zmq-sink", f"endpoint={endpoint}", "timeout=3s", *sender_keys,
                                "--input", f">{into_sink}")
        try:
            for batch in (Batch(format=STREAM, payload=np.frombuffer(b"stream bytes", np.uint8)),
                          Batch.control(Flag.END_OF_STREAM, 0, format=STREAM)):
                push.send_multipart(batch.to_frames())
            received: list[Batch] = []
            while pull.poll(20000 if sender_key == "client" else 2000):
                received.extend(Batch.bundle_from_frames(pull.recv_multipart()))
                if received[-1].flags & Flag.END_OF_STREAM:
                    pull.close()    # a finished stage waits until its downstream has closed the link
                    break
            receiver_output, _ = receiver.communicate(timeout=30)
            sender.communicate(timeout=30)
        finally:
            for process in (receiver, sender):
                process.kill()
                process.wait()
    if sender_key == "client":
        assert receiver.returncode == 0 and sender.returncode == 0
        assert received and received[0].payload.tobytes() == b"stream bytes"
    else:
        assert received == []
        assert receiver.returncode == 1 and "nothing received" in receiver_output
        assert ("refused a peer at 127.0.0.1: unknown key" if sender_key == "stranger"
                else "failed its handshake") in receiver_output
        assert sender.returncode == 1
