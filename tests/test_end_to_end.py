"""The whole system, tracker to replica: live over tcp, and from recorded stream files
(intact, truncated, corrupted, replayed by a receiver that is killed and restarted)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from pipeline.errors import ReplicaError, StageFailed
from pipeline import Pipeline, PipelineHandle, RunResult
from stages.common.acks import AckListener
from stages.classify import Classify
from stages.apps.demo import DemoOptions, free_tcp_endpoint, receiver_stages, sender_stages
from stages.common.security import StreamKeys
from stages.entropy import Decode, Zstd
from stages.framer import Deframe, Frame
from stages.replica import ReplicaSink
from stages.common.replica_store import ReplicaStore, load_replica, read_manifest, region_keys, verify_replica
from stages.rle import RunLengthEncode
from stages.trackers.region import RegionSource, tracked_array
from stages.trackers.workload import make_workload
from stages.transport import FileSink, FileSource
from stages.xor_delta import XorDelta

REPO = Path(__file__).resolve().parent.parent


def replica_bytes(path) -> np.ndarray:
    return load_replica(path)["region0"]


def record_stream(path: Path, *, kind: str = "kv", size: int = 1 << 20, epochs: int = 10, seed: int = 3,
                  steps: int = 16) -> list[np.ndarray]:
    """Record a workload's checkpoints as a stream file; returns the memory at each epoch (index = epoch)."""
    memory = tracked_array(size)
    workload = make_workload(kind, memory, seed)
    source = RegionSource(regions=memory)
    snapshots = [np.empty(0, dtype=np.uint8)]
    pipeline = Pipeline.chain(source, Classify(), XorDelta(cache=size), RunLengthEncode(), Zstd(), Frame(),
                              FileSink(path=str(path)))
    with pipeline.start(mode="inline") as handle:
        for _ in range(epochs):
            for _ in range(steps):
                workload.step()
            source.checkpoint()
            snapshots.append(memory.copy())
        source.close()
        handle.wait(timeout=60)
    return snapshots


def replay(stream: Path, replica: Path, **sink_properties) -> None:
    Pipeline.chain(FileSource(path=str(stream)), Deframe(), Decode(),
                   ReplicaSink(path=str(replica), fsync=False, **sink_properties)).run(mode="inline", timeout=60)


def assert_exactly_one_committed_epoch(replica: Path, snapshots: list[np.ndarray]) -> int:
    """Opened as a restarted receiver would, the replica equals the source at its manifest's epoch
    (or holds nothing); returns that epoch."""
    before_recovery = None if read_manifest_or_none(replica) is None else load_replica(replica)
    ReplicaStore(replica).close()
    try:
        epoch = read_manifest(replica)["epoch"]
    except ReplicaError:
        with pytest.raises(ReplicaError, match="nothing committed"):
            load_replica(replica)
        return 0
    assert verify_replica(replica).ok
    np.testing.assert_array_equal(replica_bytes(replica), snapshots[epoch])
    if before_recovery is not None:     # what a reader saw before recovery is the same epoch
        np.testing.assert_array_equal(before_recovery["region0"], snapshots[epoch])
    return epoch


def read_manifest_or_none(replica: Path) -> dict | None:
    try:
        return read_manifest(replica)
    except ReplicaError:
        return None


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("stream") / "kv.pagepipe"
    return path, record_stream(path)


@dataclass
class LiveReplication:
    """A region-src sender and a replica-sink receiver over tcp, with the ack channel between them."""

    source: RegionSource
    listener: AckListener
    sender: PipelineHandle
    receiver: PipelineHandle

    def finish(self) -> RunResult:
        """End the stream after the checkpoints taken; both pipelines run to their end (the receiver's result)."""
        self.source.close()
        self.sender.wait(timeout=30)
        return self.receiver.wait(timeout=30)


@contextlib.contextmanager
def live_replication(memory: np.ndarray, replica: Path, *, mode: str = "process", endpoint: str | None = None,
                     **options) -> Iterator[LiveReplication]:
    """The demo's sender and receiver pipelines (DemoOptions ``options``) replicating ``memory``;
    every pipeline and socket is stopped on the way out, also on failure."""
    source = RegionSource(regions=memory)
    keys = StreamKeys.create(replica.parent / "keys")
    listener = AckListener("tcp://127.0.0.1:*", **keys.sender_acks()).attach(source)
    demo = DemoOptions(size=memory.size, **options)
    endpoint = endpoint or free_tcp_endpoint()
    handles = []
    try:
        handles.append(Pipeline.chain(*receiver_stages(demo, endpoint, listener.endpoint, str(replica), keys))
                       .start(mode=mode))
        handles.append(Pipeline.chain(*sender_stages(source, demo, endpoint, keys)).start(mode=mode))
        yield LiveReplication(source, listener, sender=handles[1], receiver=handles[0])
    finally:
        for handle in reversed(handles):
            handle.stop()
        listener.close()


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_live_replication_over_tcp_with_acks(tmp_path, mode):
    memory = tracked_array(2 << 20)
    workload = make_workload("log", memory, 5)
    with live_replication(memory, tmp_path / "replica", mode=mode) as live:
        for _ in range(8):
            for _ in range(16):
                workload.step()
            info = live.source.checkpoint()
        live.source.checkpoint(wait=True, timeout=30)          # output commit: released once the replica has it
        assert live.listener.acked_epoch == info.epoch + 1
        np.testing.assert_array_equal(replica_bytes(tmp_path / "replica"), memory)
        live.finish()


def test_recorded_stream_replays_to_the_last_epoch(recorded, tmp_path):
    stream, snapshots = recorded
    replay(stream, tmp_path / "replica")
    assert assert_exactly_one_committed_epoch(tmp_path / "replica", snapshots) == len(snapshots) - 1


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.55, 0.8, 0.97, 0.9999])
def test_truncated_stream_leaves_replica_at_a_committed_epoch(recorded, tmp_path, fraction):
    stream, snapshots = recorded
    data = stream.read_bytes()
    cut = tmp_path / "cut.pagepipe"
    cut.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(StageFailed, match="truncated|ended|torn"):
        replay(cut, tmp_path / "replica")
    epoch = assert_exactly_one_committed_epoch(tmp_path / "replica", snapshots)
    assert epoch < len(snapshots) - 1


@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.4, 0.7, 0.95])
def test_corrupted_stream_is_refused_and_replica_stays_committed(recorded, tmp_path, fraction):
    stream, snapshots = recorded
    data = bytearray(stream.read_bytes())
    data[int(len(data) * fraction)] ^= 0x5A
    damaged = tmp_path / "damaged.pagepipe"
    damaged.write_bytes(bytes(data))
    with pytest.raises(StageFailed, match="CorruptData"):
        replay(damaged, tmp_path / "replica")
    assert_exactly_one_committed_epoch(tmp_path / "replica", snapshots)


def test_restarted_sender_replaces_the_replica(recorded, tmp_path):
    stream, _ = recorded
    replay(stream, tmp_path / "replica")
    other = tmp_path / "other.pagepipe"
    other_snapshots = record_stream(other, kind="sim", epochs=4, seed=9)   # a new sender: epochs from 1
    replay(other, tmp_path / "replica")
    assert assert_exactly_one_committed_epoch(tmp_path / "replica", other_snapshots) == 4


def _launch_process(description: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``pagepipe launch --mode inline DESCRIPTION`` in its own process (one process: SIGKILL stops all of it)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "launch", "--mode", "inline", description],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _receiver_process(stream: Path, replica: Path) -> subprocess.Popen:
    """A receiver in its own process: replays the stream into the replica, fsync on (long commits)."""
    return _launch_process(f"file-src path={stream} ! deframe ! decode ! replica-sink path={replica} fsync=true")


def _committed_epoch(replica: Path) -> int:
    manifest = read_manifest_or_none(replica)
    return 0 if manifest is None else manifest["epoch"]


def test_receiver_killed_during_apply_restarts_at_a_committed_epoch(tmp_path):
    stream = tmp_path / "sim.pagepipe"
    snapshots = record_stream(stream, kind="sim", size=8 << 20, epochs=12, steps=8)
    replica = tmp_path / "replica"
    for target in (1, 5, 9):
        receiver = _receiver_process(stream, replica)
        try:
            deadline = time.monotonic() + 60
            while _committed_epoch(replica) < target and receiver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
        finally:
            receiver.send_signal(signal.SIGKILL)    # usually while it applies the next epoch
            receiver.wait()
        assert assert_exactly_one_committed_epoch(replica, snapshots) >= target
    finisher = _receiver_process(stream, replica)       # restarted: the stream's epoch 1 is a baseline
    _, errors = finisher.communicate(timeout=120)
    assert finisher.returncode == 0, errors.decode()
    assert assert_exactly_one_committed_epoch(replica, snapshots) == len(snapshots) - 1


def test_replica_damaged_while_running_is_resynchronised(tmp_path):
    """The receiver finds its replica inconsistent (a digest mismatch), asks for a resync over the
    ack channel, the tracker sends every page whole, and the replica converges again."""
    memory = tracked_array(1 << 20)
    workload = make_workload("kv", memory, 2)
    replica = tmp_path / "replica"
    with live_replication(memory, replica, codec="native") as live:
        source, listener = live.source, live.listener
        for _ in range(3):
            workload.step()
            source.checkpoint(wait=True, timeout=30)
        with open(replica / "pages.img", "r+b") as image:     # bit rot under the running receiver
            for page in range(memory.size // 4096):
                image.seek(page * 4096 + 100)
                image.write(b"\xde\xad\xbe\xef")
        resyncs_before = listener.counters["resyncs"]        # the receiver's start-up request
        deadline = time.monotonic() + 30
        while listener.counters["resyncs"] == resyncs_before and time.monotonic() < deadline:
            workload.step()
            source.checkpoint()
            time.sleep(0.02)
        assert listener.counters["resyncs"] > resyncs_before
        source.checkpoint()                                  # carries every page, flagged RESYNC
        source.checkpoint(wait=True, timeout=30)
        np.testing.assert_array_equal(replica_bytes(replica), memory)
        assert verify_replica(replica).ok
        counters = live.finish().statistics[("replica-sink0", 0)]["counters"]
        assert counters["epochs_discarded"] >= 1 and counters["resyncs_requested"] >= 2   # on start, then for the damage


CHILD_PROGRAM = """
import time
memory = bytearray(4 << 20)
step = 0
while True:
    memory[(step * 4099) % len(memory)] = step % 251
    step += 1
    if step % 1000 == 0:
        time.sleep(0.001)
"""


def test_live_process_is_replicated_and_equals_its_memory(tmp_path):
    """The documented launch lines: process-src on a working child, replica compared with /proc/PID/mem."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_PROGRAM])
    endpoint = free_tcp_endpoint()
    replica = tmp_path / "replica"
    keys = StreamKeys.create(tmp_path / "keys")
    try:
        receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} {keys.words(keys.receiver_source())} ! deframe ! "
                                  f"decode ! replica-sink path={replica}").start(mode="process")
        sender = Pipeline.parse(f"process-src pid={child.pid} interval=25ms checkpoints=8 stop-at-end=true ! "
                                f"classify ! xor-delta ! rle ! zstd ! frame ! zmq-sink endpoint={endpoint} "
                                f"{keys.words(keys.sender_sink())}")
        try:
            sender.run(mode="process", timeout=60)
            receiver.wait(timeout=60)
        finally:
            receiver.stop()
        manifest = read_manifest(replica)
        assert manifest["epoch"] == 8
        regions = load_replica(replica)
        with open(f"/proc/{child.pid}/mem", "rb") as memory:
            for key, region in zip(region_keys(tuple(manifest["regions"])), manifest["regions"]):
                memory.seek(region["start"])
                live = np.frombuffer(memory.read(region["npages"] * 4096), dtype=np.uint8)
                np.testing.assert_array_equal(regions[key], live, err_msg=f"region {key}")
    finally:
        child.kill()
        child.wait()


def test_sender_killed_mid_stream_then_restarted(tmp_path):
    """A sender process dies (SIGKILL) mid-stream: the replica stays at its last committed epoch;
    a restarted sender's first epoch is a baseline, and the replica follows it."""
    endpoint = free_tcp_endpoint()
    replica = tmp_path / "replica"
    keys = StreamKeys.create(tmp_path / "keys")
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} {keys.words(keys.receiver_source())} ! deframe ! "
                              f"decode ! replica-sink path={replica} fsync=false").start(mode="process")
    sender = _launch_process(f"workload-src kind=sim size=4MiB seconds=60s rate=40 ! classify ! xor-delta ! rle ! "
                             f"frame ! zmq-sink endpoint={endpoint} {keys.words(keys.sender_sink())}",
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _committed_epoch(replica) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sender.send_signal(signal.SIGKILL)
        sender.wait()
        receiver.stop()          # its torn epoch, if any, is discarded
    ReplicaStore(replica).close()
    assert _committed_epoch(replica) >= 3
    assert verify_replica(replica).ok

    memory = tracked_array(4 << 20)
    workload = make_workload("sim", memory, 8)
    with live_replication(memory, replica, endpoint=endpoint, codec="native") as live:
        for _ in range(4):
            workload.step()
            info = live.source.checkpoint()
        live.source.checkpoint(wait=True, timeout=30)
        assert read_manifest(replica)["epoch"] == info.epoch + 1
        np.testing.assert_array_equal(replica_bytes(replica), memory)
        live.finish()


def _live_receiver_process(endpoint: str, ack_endpoint: str, replica: Path, keys: StreamKeys) -> subprocess.Popen:
    """The documented receiver of a live stream, in its own process: joins at the next resync segment."""
    return _launch_process(f"zmq-src endpoint={endpoint} {keys.words(keys.receiver_source())} ! deframe resume=true "
                           f"! decode ! replica-sink path={replica} fsync=false ack-endpoint={ack_endpoint} "
                           f"{keys.words(keys.receiver_acks())}")


def _checkpoint_until(source: RegionSource, workload, done, timeout: float = 60.0) -> None:
    """Keep the sender checkpointing (as a live program would) until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        workload.step()
        source.checkpoint()
        time.sleep(0.02)


@pytest.mark.parametrize("replica_lost", [False, True], ids=["replica-kept", "replica-lost"])
def test_receiver_killed_and_restarted_on_a_live_stream_resyncs_and_catches_up(tmp_path, replica_lost):
    """A receiver process is SIGKILLed while the sender keeps checkpointing; restarted (with its
    replica, or with the replica directory deleted), it asks for a resync on start, the sender's next
    epoch is a RESYNC baseline in a new segment, deframe resumes there and the replica equals the source."""
    memory = tracked_array(2 << 20)
    workload = make_workload("kv", memory, 4)
    source = RegionSource(regions=memory, max_unacked=4)
    keys = StreamKeys.create(tmp_path / "keys")
    listener = AckListener("tcp://127.0.0.1:*", **keys.sender_acks()).attach(source)
    options = DemoOptions(size=memory.size, codec="native+zstd")
    endpoint = free_tcp_endpoint()
    replica = tmp_path / "replica"
    receivers = [_live_receiver_process(endpoint, listener.endpoint, replica, keys)]
    sender = Pipeline.chain(*sender_stages(source, options, endpoint, keys)).start(mode="process")
    try:
        for _ in range(3):
            workload.step()
            source.checkpoint(wait=True, timeout=60)
        for _ in range(2):                                   # epochs in flight when the receiver dies
            workload.step()
            source.checkpoint()
        receivers[0].send_signal(signal.SIGKILL)
        receivers[0].wait()
        committed_before = _committed_epoch(replica)
        assert committed_before >= 3 and verify_replica(replica).ok
        for _ in range(2):                                   # the sender runs on, nobody listening
            workload.step()
            source.checkpoint()
        if replica_lost:
            shutil.rmtree(replica)
        resyncs_before = listener.counters["resyncs"]
        receivers.append(_live_receiver_process(endpoint, listener.endpoint, replica, keys))
        _checkpoint_until(source, workload, lambda: listener.counters["resyncs"] > resyncs_before)
        workload.step()
        info = source.checkpoint(wait=True, timeout=60)      # the resync epoch (or the one after) is acknowledged
        assert read_manifest(replica)["epoch"] == info.epoch > committed_before
        np.testing.assert_array_equal(replica_bytes(replica), memory)
        for _ in range(2):                                   # and the stream goes on in deltas
            workload.step()
            info = source.checkpoint()
        source.checkpoint(wait=True, timeout=60)
        assert read_manifest(replica)["epoch"] == info.epoch + 1 and read_manifest(replica)["resync"] is False
        np.testing.assert_array_equal(replica_bytes(replica), memory)
        assert verify_replica(replica).ok
        source.close()
        sender.wait(timeout=30)
        _, errors = receivers[-1].communicate(timeout=30)
        assert receivers[-1].returncode == 0, errors.decode()
    finally:
        sender.stop()
        for receiver in receivers:
            if receiver.poll() is None:
                receiver.kill()
            receiver.wait()
        listener.close()
