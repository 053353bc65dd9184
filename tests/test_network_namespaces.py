"""Stages on other hosts: sender and receiver in two network namespaces joined by a veth pair, over tcp.

The test makes the namespaces itself (only addresses inside them, 10.200.N.1 and
10.200.N.2 on the veth) and removes them afterwards, also on failure. The sender
side runs ``pagepipe launch`` (the whole sender chain, ending in ``zmq-sink
channels=3`` with CurveZMQ keys); the receiver side runs each stage as its own
``pagepipe stage`` process, linked by ipc sockets, as a process manager on a real
host would (README, "Cores, channels and hosts"). The replica must hold the last
checkpoint exactly. Skipped, saying why, where namespaces cannot be made
(not root, no ``ip``, no CAP_NET_ADMIN).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stages.bench.channels import replica_state
from stages.common.security import write_keypair

PAGEPIPE = str(Path(sys.executable).parent / "pagepipe")
EPOCHS, PAGES, CHANNELS = 8, 400, 3   # batch-pages=32: what stages.bench.channels.replica_state expects


def _ip(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=20)


def _namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"pp-probe-{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


@pytest.fixture
def two_hosts():
    """Two namespaces (sender, receiver) joined by a veth pair: yields (sender ns, receiver ns, receiver address)."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    tag = uuid.uuid4().hex[:6]
    sender, receiver = f"pp-send-{tag}", f"pp-recv-{tag}"
    subnet = 10 + int(tag[:2], 16) % 200
    veth_a, veth_b = f"ppa{tag}", f"ppb{tag}"
    made: list[str] = []
    try:
        for namespace in (sender, receiver):
            assert _ip("netns", "add", namespace).returncode == 0
            made.append(namespace)
        steps = [("link", "add", veth_a, "type", "veth", "peer", "name", veth_b),
                 ("link", "set", veth_a, "netns", sender), ("link", "set", veth_b, "netns", receiver),
                 ("-n", sender, "addr", "add", f"10.200.{subnet}.1/24", "dev", veth_a),
                 ("-n", receiver, "addr", "add", f"10.200.{subnet}.2/24", "dev", veth_b),
                 ("-n", sender, "link", "set", veth_a, "up"), ("-n", receiver, "link", "set", veth_b, "up"),
                 ("-n", sender, "link", "set", "lo", "up"), ("-n", receiver, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield sender, receiver, f"10.200.{subnet}.2"
    finally:
        for namespace in made:          # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "delete", namespace)
        _ip("link", "delete", veth_a)   # in case it never moved into a namespace


def _in(namespace: str, *command: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", namespace, *command], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_sender_and_receiver_in_two_network_namespaces_replicate_over_several_tcp_channels(two_hosts, tmp_path):
    sender_ns, receiver_ns, address = two_hosts
    replica = tmp_path / "replica"
    keys = tmp_path / "keys"
    sender_secret, receiver_secret = (str(write_keypair(keys, name)[1]) for name in ("primary", "backup"))
    (keys / "allowed").mkdir()
    (keys / "allowed" / "primary.key").write_bytes((keys / "primary.key").read_bytes())
    stream = f"tcp://{address}:5555"                  # channels on ports 5555, 5556, 5557 of the receiver host
    link = f"ipc://{tmp_path}/rx"
    receiver_commands = [
        [PAGEPIPE, "stage", "zmq-src", f"endpoint={stream}", f"channels={CHANNELS}", "timeout=60s",
         f"secret-key={receiver_secret}", f"authorized-keys={keys / 'allowed'}", "--output", f"{link}1"],
        [PAGEPIPE, "stage", "deframe", "resume=true", "--input", f"{link}1", "--output", f"{link}2"],
        [PAGEPIPE, "stage", "decode", "--input", f"{link}2", "--output", f"{link}3"],
        [PAGEPIPE, "stage", "replica-sink", f"path={replica}", "fsync=false", "--input", f"{link}3"],
    ]
    sender_command = [PAGEPIPE, "launch", "--mode=process", "--timeout=120",
                      f"test-src epochs={EPOCHS} pages={PAGES} batch-pages=32 pattern=random resync=true ! classify "
                      f"! xor-delta ! rle ! zstd ! frame ! zmq-sink endpoint={stream} channels={CHANNELS} "
                      f"timeout=30s secret-key={sender_secret} server-key={keys / 'backup.key'}"]
    processes: list[subprocess.Popen] = []
    try:
        for index, command in enumerate(receiver_commands):
            processes.append(_in(receiver_ns, *command, log=tmp_path / f"receiver{index}.log"))
        time.sleep(0.5)                                  # the receiver binds first, as its unit would start first
        sender = _in(sender_ns, *sender_command, log=tmp_path / "sender.log")
        processes.append(sender)
        assert sender.wait(timeout=120) == 0, (tmp_path / "sender.log").read_text()[-2000:]
        for index, process in enumerate(processes[:-1]):
            assert process.wait(timeout=60) == 0, (tmp_path / f"receiver{index}.log").read_text()[-2000:]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait(10)
    assert replica_state(replica, PAGES) == (EPOCHS, True)   # test-src resync=true counts epochs from 1
