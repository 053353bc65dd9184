"""replica-sink fed by hand: atomic, ordered, verified epochs; discards, resync and acknowledgements."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from pipeline.batch import PAGES, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData, ReplicaError
from pipeline.stage import StageContext
from stages.common.acks import AckListener
from stages.classify import Classify
from stages.entropy import Zstd
from stages.common.pages import combine_digests, digest_pages
from stages import replica
from stages.replica import ReplicaSink
from stages.common.replica_store import (IMAGE, ReplicaLock, ReplicaLocked, ReplicaStore, load_replica,
                                         read_manifest, verify_replica, zero_page_digest,
                                         disk_free_bytes)
from stages.rle import RunLengthEncode
from stages.trackers.epochs import EpochStream
from stages.xor_delta import XorDelta

PAGE = 4096
NPAGES = 24
REGIONS = [{"name": "heap", "start": 0x7F0000000000, "first_page": 0, "npages": 16},
           {"name": "data", "start": 0x600000, "first_page": 16, "npages": 8}]


class Sender:
    """The sender side in miniature: its memory, and the real sender stages it runs through."""

    def __init__(self, codec: str = "native", seed: int = 1):
        self.rng = np.random.default_rng(seed)
        self.memory = self.rng.integers(0, 256, (NPAGES, PAGE), dtype=np.uint8)
        self.memory[3] = 0
        self.stream = EpochStream(PAGE, batch_pages=5)
        run_format, *entropy = codec.split("+")
        self.stages = [Classify(), XorDelta(cache_pages=NPAGES), RunLengthEncode(format=run_format)]
        self.stages += [Zstd() for _ in entropy]
        for stage in self.stages:
            stage.start(StageContext(stage.factory_name))
        self.epoch = 0

    def run(self, batches: list[Batch]) -> list[Batch]:
        for stage in self.stages:
            batches = [out for batch in batches for out in stage.handle(batch)]
        return batches

    def layout(self) -> Batch:
        return self.run([Batch.control(Flag.LAYOUT, self.epoch + 1, page_size=PAGE, regions=REGIONS)])[0]

    def dirty(self, count: int) -> np.ndarray:
        page_numbers = np.sort(self.rng.choice(NPAGES, count, replace=False)).astype(np.uint64)
        for page in page_numbers:
            offset = int(self.rng.integers(0, PAGE - 64))
            self.memory[page, offset:offset + 64] = self.rng.integers(0, 256, 64, dtype=np.uint8)
        return page_numbers

    def epoch_batches(self, page_numbers: np.ndarray, *, resync: bool = False) -> list[Batch]:
        """Encoded data batches of the next epoch plus its EPOCH_END (count and digest)."""
        self.epoch += 1
        data = self.memory[page_numbers.astype(np.intp)]
        tracker_batches = list(self.stream.pages(self.epoch, page_numbers, data, resync))
        tracker_batches.append(self.stream.end(self.epoch, pause=0.0, resync=resync))
        return self.run(tracker_batches)

    def full_epoch(self, **kwargs) -> list[Batch]:
        return self.epoch_batches(np.arange(NPAGES, dtype=np.uint64), **kwargs)


class Bus:
    def __init__(self):
        self.messages: list[tuple[str, dict]] = []

    def post(self, kind: str, **fields) -> None:
        self.messages.append((kind, fields))

    def warnings(self) -> list[str]:
        return [fields["message"] for kind, fields in self.messages if kind == "warning"]


def started_sink(path, bus: Bus | None = None, **properties) -> ReplicaSink:
    sink = ReplicaSink(path=str(path), fsync=False, **properties)
    sink.start(StageContext("replica-sink", post=(bus or Bus()).post))
    return sink


def feed(sink: ReplicaSink, batches: list[Batch]) -> None:
    for batch in batches:
        assert list(sink.handle(batch)) == []


def replica_memory(path) -> np.ndarray:
    regions = load_replica(path)
    return np.concatenate([regions["heap"], regions["data"]]).reshape(NPAGES, PAGE)


def test_epochs_are_committed_and_replica_equals_sender(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    for _ in range(4):
        feed(sink, sender.epoch_batches(sender.dirty(7)))
        np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    assert read_manifest(tmp_path)["epoch"] == 5
    assert sink.counters["epochs_committed"] == 5
    sink.stop()


@pytest.mark.parametrize("codec", ["xbzrle", "xen", "native+zstd"])
def test_every_codec_chain_is_applied(tmp_path, codec):
    sender = Sender(codec)
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    feed(sink, sender.epoch_batches(sender.dirty(9)))
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


def test_raw_pages_in_an_encoded_batch_are_applied_as_whole_pages(tmp_path):
    sender = Sender()
    batches = [sender.layout()] + sender.full_epoch()
    raw = [batch.with_(kinds=np.where(batch.kinds == PageKind.FULL, np.uint8(PageKind.RAW), batch.kinds))
           if batch.npages else batch for batch in batches]
    assert sum(int((batch.kinds == PageKind.RAW).sum()) for batch in raw if batch.npages) == NPAGES - 1
    sink = started_sink(tmp_path)
    feed(sink, raw)
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


def test_unencoded_pages_stream_is_applied(tmp_path):
    sender = Sender()
    page_numbers = np.arange(NPAGES, dtype=np.uint64)
    kinds = np.full(NPAGES, PageKind.NORMAL, dtype=np.uint8)
    kinds[3] = PageKind.ZERO
    data = sender.memory.copy()
    data[3] = 0xAA  # data of a ZERO page is meaningless
    digest = combine_digests(page_numbers, digest_pages(sender.memory))
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout(),
                Batch(format=PAGES, epoch=1, page_size=PAGE, page_numbers=page_numbers, kinds=kinds, data=data),
                Batch.control(Flag.EPOCH_END, 1, page_size=PAGE, pages=NPAGES, digest=int(digest))])
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


def test_nothing_is_written_before_the_commit_record(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    *data, end = sender.full_epoch()
    feed(sink, [sender.layout()] + data)
    assert not (tmp_path / IMAGE).exists()
    feed(sink, [end])
    assert (tmp_path / IMAGE).exists()
    sink.stop()


def test_digest_mismatch_discards_epoch_and_keeps_last_commit(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus)
    feed(sink, [sender.layout()] + sender.full_epoch())
    before = sender.memory.copy()
    *data, end = sender.epoch_batches(sender.dirty(5))
    end.meta["digest"] ^= 1
    feed(sink, data + [end])
    np.testing.assert_array_equal(replica_memory(tmp_path), before)
    assert read_manifest(tmp_path)["epoch"] == 1
    assert any("epoch 2 discarded (digest mismatch" in w for w in bus.warnings())
    sink.stop()


def test_torn_epoch_is_discarded_at_end_of_stream(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus)
    feed(sink, [sender.layout()] + sender.full_epoch())
    *data, _ = sender.epoch_batches(sender.dirty(5))
    feed(sink, data[:1] + [Batch.control(Flag.END_OF_STREAM, 2)])
    assert read_manifest(tmp_path)["epoch"] == 1
    assert any("torn" in w for w in bus.warnings())
    sink.stop()


def test_torn_epoch_followed_by_next_epoch_is_discarded(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus)
    feed(sink, [sender.layout()] + sender.full_epoch())
    torn = sender.epoch_batches(sender.dirty(8))[:1]
    feed(sink, torn + sender.epoch_batches(sender.dirty(3)))
    assert read_manifest(tmp_path)["epoch"] == 1
    assert any("epoch 2 discarded (torn" in w for w in bus.warnings())
    assert sink.counters["epochs_discarded"] == 2  # epoch 3 follows a gap
    sink.stop()


def test_page_count_mismatch_is_torn(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus)
    feed(sink, [sender.layout()] + sender.full_epoch())
    batches = sender.epoch_batches(sender.dirty(8))
    feed(sink, batches[1:])
    assert read_manifest(tmp_path)["epoch"] == 1
    assert any("commit record says 8 pages, 3 arrived" in w for w in bus.warnings())
    sink.stop()


def test_gap_discards_until_resync_epoch_arrives(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus)
    feed(sink, [sender.layout()] + sender.full_epoch())
    sender.epoch_batches(sender.dirty(4))          # epoch 2 lost on the way
    feed(sink, sender.epoch_batches(sender.dirty(4)))
    feed(sink, sender.epoch_batches(sender.dirty(4)))
    assert read_manifest(tmp_path)["epoch"] == 1
    assert any("gap: replica is at epoch 1" in w for w in bus.warnings())
    feed(sink, sender.full_epoch(resync=True))
    feed(sink, sender.epoch_batches(sender.dirty(6)))
    assert read_manifest(tmp_path)["epoch"] == 6
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


def test_restarted_sink_resumes_from_committed_epoch(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch() + sender.epoch_batches(sender.dirty(5)))
    sink.stop()
    resumed = started_sink(tmp_path)
    assert resumed.in_sync and resumed.store.epoch == 2
    feed(resumed, [sender.layout()] + sender.epoch_batches(sender.dirty(5)))
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    resumed.stop()


def test_restarted_sender_baseline_replaces_replica(tmp_path):
    old_sender = Sender(seed=1)
    sink = started_sink(tmp_path)
    feed(sink, [old_sender.layout()] + old_sender.full_epoch() + old_sender.epoch_batches(old_sender.dirty(5)))
    new_sender = Sender(seed=2)                     # counts epochs from 1 again
    feed(sink, [new_sender.layout()] + new_sender.full_epoch() + new_sender.epoch_batches(new_sender.dirty(4)))
    assert read_manifest(tmp_path)["epoch"] == 2
    np.testing.assert_array_equal(replica_memory(tmp_path), new_sender.memory)
    sink.stop()


def test_damaged_replica_on_start_is_cleared_and_resynced(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    sink.stop()
    with open(tmp_path / IMAGE, "r+b") as image:
        image.write(b"\x01\x02\x03")
    restarted = started_sink(tmp_path, bus)
    assert restarted.store.is_empty and not restarted.in_sync
    assert any("inconsistent" in w for w in bus.warnings())
    feed(restarted, [sender.layout()] + sender.epoch_batches(sender.dirty(3)))   # a delta: cannot apply
    feed(restarted, sender.full_epoch(resync=True))
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    restarted.stop()


def test_page_number_outside_layout_is_refused(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    bad = sender.epoch_batches(sender.dirty(3))[0]
    bad.page_numbers = bad.page_numbers.copy()
    bad.page_numbers[1] = NPAGES + 7
    with pytest.raises(CorruptData, match=f"page 1 has page number {NPAGES + 7} outside the layout"):
        feed(sink, [bad])
    sink.stop()
    assert read_manifest(tmp_path)["epoch"] == 1


def test_unknown_codec_is_refused(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()])
    bad = sender.full_epoch()[0]
    bad.meta["codec"] = "brotli"
    with pytest.raises(CorruptData, match="unknown codec 'brotli'"):
        feed(sink, [bad])
    sink.stop()


def test_corrupt_payload_is_refused(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    batch = next(b for b in sender.epoch_batches(sender.dirty(8)) if (b.kinds == PageKind.DELTA).any())
    batch.payload = batch.payload[: batch.payload.size // 2].copy()
    batch.offsets = np.minimum(batch.offsets, batch.payload.size).astype(np.uint64)
    before = (tmp_path / IMAGE).read_bytes()
    with pytest.raises(CorruptData, match="replica-sink: epoch 2"):
        feed(sink, [batch])
    sink.stop()
    assert (tmp_path / IMAGE).read_bytes() == before and read_manifest(tmp_path)["epoch"] == 1


def test_oversized_epoch_is_refused(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path, max_epoch=8 * PAGE)
    feed(sink, [sender.layout()])
    with pytest.raises(CorruptData, match="exceeds max-epoch"):
        feed(sink, sender.full_epoch())
    sink.stop()


def test_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="path is required"):
        ReplicaSink().start(StageContext("replica-sink"))


@pytest.mark.parametrize("below", ["", "replica"])
def test_path_at_or_under_a_regular_file_is_a_replica_error_naming_it(tmp_path, below):
    (tmp_path / "file").write_bytes(b"not a directory")
    path = tmp_path / "file" / below if below else tmp_path / "file"
    with pytest.raises(ReplicaError, match=f"replica {path}: .*(directory|exists)"):
        started_sink(path)
    assert (tmp_path / "file").read_bytes() == b"not a directory"


def test_unreadable_store_file_is_a_replica_error_naming_it(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    sink.stop()
    (tmp_path / "journal").mkdir()          # an OSError on opening (IsADirectoryError), not a damaged replica
    with pytest.raises(ReplicaError, match=f"replica {tmp_path}: cannot (open|delete) .*journal"):
        started_sink(tmp_path)


def test_a_starting_sink_asks_for_a_resync_naming_its_committed_epoch(tmp_path):
    reasons: list[str] = []
    requested = threading.Event()
    listener = AckListener(f"ipc://{tmp_path}/acks", on_resync=lambda reason: (reasons.append(reason), requested.set()))
    try:
        sender = Sender()
        sink = started_sink(tmp_path / "replica")
        feed(sink, [sender.layout()] + sender.full_epoch() + sender.epoch_batches(sender.dirty(4)))
        sink.stop()
        restarted = started_sink(tmp_path / "replica", ack_endpoint=listener.endpoint)
        assert requested.wait(timeout=10)
        assert reasons == ["receiver started, replica at epoch 2"]
        assert restarted.counters["resyncs_requested"] == 1
        restarted.stop()
    finally:
        listener.close()


def run_timer(sink: ReplicaSink, seconds: float, between=lambda: None) -> None:
    """Call the sink's timer as an executor does (every ``tick_interval`` while it is set), for ``seconds``;
    ``between`` runs every 5 ms (inputs arriving)."""
    next_tick, deadline = 0.0, time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        if sink.tick_interval > 0 and now >= next_tick:
            next_tick = now + sink.tick_interval
            assert list(sink.tick()) == []
        between()
        time.sleep(0.005)


def test_an_unanswered_resync_request_is_repeated_at_doubling_intervals_while_nothing_arrives(tmp_path):
    """The answer to a resync request can vanish with a connection the sender had not yet seen close, and a
    restarted receiver's deframe resume=true passes nothing on before a resync segment: the sink asks again."""
    reasons: list[str] = []
    listener = AckListener(f"ipc://{tmp_path}/acks", on_resync=reasons.append)
    sender = Sender()
    sink = started_sink(tmp_path / "replica", ack_endpoint=listener.endpoint, resync_interval="40ms")
    try:
        run_timer(sink, 0.75)
        requests = sink.counters["resyncs_requested"]
        assert 3 <= requests <= 5
        deadline = time.monotonic() + 10
        while len(reasons) < requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reasons[0].startswith("receiver started")
        waits = [float(re.search(r"nothing reached the receiver for ([0-9.]+) s after asking", reason)[1])
                 for reason in reasons[1:]]
        assert all(wait >= 0.04 * 2 ** repeat - 0.005 for repeat, wait in enumerate(waits)), waits   # 40, 80, 160 ms

        feed(sink, [sender.layout()] + sender.full_epoch(resync=True))     # the resync arrives: no more requests
        run_timer(sink, 0.2)
        assert sink.counters["resyncs_requested"] == requests and sink.tick_interval == 0

        feed(sink, sender.epoch_batches(sender.dirty(2))[:1])              # half an epoch, then a gap: discarded,
        feed(sink, sender.epoch_batches(sender.dirty(2)))                  # and a resync asked for
        assert sink.counters["resyncs_requested"] == requests + 1
        run_timer(sink, 0.3, between=lambda: feed(sink, [sender.layout()]))   # inputs keep arriving: no repeat
        assert sink.counters["resyncs_requested"] == requests + 1
    finally:
        sink.stop()
        listener.close()


def test_acks_resync_requests_and_discard_notices_reach_the_sender(tmp_path):
    reasons: list[str] = []
    discarded: list[int] = []
    requested = threading.Event()
    listener = AckListener(f"ipc://{tmp_path}/acks", on_resync=lambda reason: (reasons.append(reason), requested.set()),
                           on_discard=discarded.append)
    try:
        sender = Sender()
        sink = started_sink(tmp_path / "replica", ack_endpoint=listener.endpoint, on_error="resync")
        feed(sink, [sender.layout()] + sender.full_epoch() + sender.epoch_batches(sender.dirty(4)))
        assert listener.wait_for(2, timeout=10)
        bad = sender.epoch_batches(sender.dirty(3))
        bad[0].page_numbers = np.full_like(bad[0].page_numbers, NPAGES + 1)
        feed(sink, bad)                                 # refused, discarded, resync asked
        sink.stop()
        assert requested.wait(timeout=10)
        deadline = time.monotonic() + 10
        while len(reasons) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reasons[0].startswith("receiver started") and "outside the layout" in reasons[1]
        assert listener.acked_epoch == 2
        assert discarded == [3]
    finally:
        listener.close()


def test_acks_the_sender_cannot_take_are_reported_dropped_and_commits_go_on(tmp_path):
    # Nobody listens on the ack endpoint, so the one-message queue never drains:
    # from the second message on, every ack is dropped (deterministically, unlike
    # a bound-but-unread peer whose kernel socket buffer absorbs small messages).
    bus = Bus()
    sender = Sender()
    sink = started_sink(tmp_path / "replica", bus, ack_endpoint=f"ipc://{tmp_path}/nobody-listens", ack_queue=1)
    try:
        feed(sink, [sender.layout()] + sender.full_epoch())
        for _ in range(3):
            feed(sink, sender.epoch_batches(sender.dirty(4)))
        assert read_manifest(tmp_path / "replica")["epoch"] == 4
        assert sink.counters["acks_dropped"] >= 3
        assert any("dropped: the ack channel" in w for w in bus.warnings())
    finally:
        sink.stop()


def test_empty_epoch_is_committed(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch() + sender.epoch_batches(np.empty(0, dtype=np.uint64)))
    assert read_manifest(tmp_path)["epoch"] == 2
    feed(sink, sender.epoch_batches(sender.dirty(2)))
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


@pytest.mark.parametrize("damage, message", [
    (lambda batch: batch.with_(kinds=batch.kinds[:-1]), "kinds for"),
    (lambda batch: batch.with_(kinds=np.full_like(batch.kinds, 9)), "has kind 9"),
    (lambda batch: batch.with_(page_size=8192), "page size 8192"),
    (lambda batch: batch.with_(meta={}), "names no codec"),
    (lambda batch: batch.with_(payload=None), "without payload"),
])
def test_inconsistent_batches_are_refused(tmp_path, damage, message):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()])
    with pytest.raises(CorruptData, match=message):
        feed(sink, [damage(sender.full_epoch()[0])])
    sink.stop()


def test_pages_before_layout_are_refused(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    sender.layout()
    with pytest.raises(CorruptData, match="before any layout"):
        feed(sink, sender.full_epoch()[:1])
    sink.stop()


def test_layout_change_mid_stream_is_followed(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path)
    feed(sink, [sender.layout()] + sender.full_epoch())
    grown = REGIONS + [{"name": "mmap", "start": 0x900000, "first_page": NPAGES, "npages": 2}]
    extra = np.full((2, PAGE), 0x5A, dtype=np.uint8)
    stream = EpochStream(PAGE, batch_pages=5)
    stream.sequence = 1000
    layout = Batch.control(Flag.LAYOUT, 2, page_size=PAGE, regions=grown)
    pages = list(stream.pages(2, np.array([NPAGES, NPAGES + 1], dtype=np.uint64), extra, resync=False))
    feed(sink, sender.run([layout] + pages + [stream.end(2, pause=0.0)]))
    assert read_manifest(tmp_path)["regions"][-1]["name"] == "mmap"
    np.testing.assert_array_equal(load_replica(tmp_path)["mmap"].reshape(2, PAGE), extra)
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


# ---- failover ------------------------------------------------------------------------------

def sender_lost() -> Batch:
    return Batch.control(Flag.SENDER_LOST, 0, silence=1.25, last_heard=1.0e9)


def test_a_lost_sender_fails_over_without_committing_its_torn_epoch(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr("stages.common.replica_store.ReplicaStore.sync", lambda store: synced.append(store.epoch))
    sender, bus = Sender(), Bus()
    marker = tmp_path / "ran"
    sink = started_sink(tmp_path / "replica", bus, on_failover=f'echo "$PAGEPIPE_EPOCH $PAGEPIPE_REPLICA" > {marker}')
    feed(sink, [sender.layout()] + sender.full_epoch() + sender.epoch_batches(sender.dirty(4)))
    committed = sender.memory.copy()
    torn = sender.epoch_batches(sender.dirty(5))[:-1]       # epoch 3 without its commit record
    feed(sink, torn + [sender_lost()])
    assert synced == [2]                                     # durable before anything else happens
    (kind, fields), = [(k, f) for k, f in bus.messages if k == "failover"]
    assert fields["epoch"] == 2 and fields["silence"] == 1.25
    assert fields["replica"] == str((tmp_path / "replica").resolve())
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text().split() == ["2", str((tmp_path / "replica").resolve())]
    assert any("epoch 3 discarded (torn: the sender was lost" in w for w in bus.warnings())
    np.testing.assert_array_equal(replica_memory(tmp_path / "replica"), committed)
    assert sink.failed_over and sink.counters["failovers"] == 1
    sink.stop()


def test_after_failover_the_stale_sender_is_refused(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus)
    feed(sink, [sender.layout()] + sender.full_epoch() + [sender_lost()])
    committed = sender.memory.copy()
    feed(sink, [sender.layout()] + sender.full_epoch(resync=True) + sender.epoch_batches(sender.dirty(3)))
    np.testing.assert_array_equal(replica_memory(tmp_path), committed)
    assert read_manifest(tmp_path)["epoch"] == 1
    assert sink.counters["epochs_refused"] == 2 and sink.counters["epochs_committed"] == 1
    assert any("epoch 2 refused: the replica failed over at epoch 1" in w for w in bus.warnings())
    sink.stop()


def test_after_failover_a_sender_told_to_resync_is_followed_again_from_a_full_epoch(tmp_path):
    sender, bus = Sender(), Bus()
    sink = started_sink(tmp_path, bus, after_failover="resync")
    feed(sink, [sender.layout()] + sender.full_epoch() + [sender_lost()])
    feed(sink, sender.epoch_batches(sender.dirty(3)))            # a delta epoch cannot be applied any more
    assert read_manifest(tmp_path)["epoch"] == 1
    feed(sink, [sender.layout()] + sender.full_epoch(resync=True) + sender.epoch_batches(sender.dirty(3)))
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    assert read_manifest(tmp_path)["epoch"] == 4 and not sink.failed_over
    sink.stop()


def test_failover_makes_a_replica_without_fsync_durable(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr("stages.common.replica_store.os.fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    sender = Sender()
    sink = started_sink(tmp_path)       # fsync=false: commits never fsync
    feed(sink, [sender.layout()] + sender.full_epoch())
    assert calls == []
    feed(sink, [sender_lost()])
    assert len(calls) >= 4              # image, digests, manifest, directory
    sink.stop()


def test_with_fsync_an_epoch_is_acknowledged_at_its_durable_journal_and_settled_at_the_next_tick(tmp_path):
    from stages.common.replica_store import JOURNAL
    sender = Sender()
    sink = ReplicaSink(path=str(tmp_path), fsync=True)
    sink.start(StageContext("replica-sink"))
    feed(sink, [sender.layout()] + sender.full_epoch())
    assert sink.tick_interval == 0              # nothing to settle: no timer
    feed(sink, sender.epoch_batches(sender.dirty(4)))
    assert sink.tick_interval > 0 and sink.store.unsettled and (tmp_path / JOURNAL).stat().st_size > 0
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    assert list(sink.tick()) == []
    assert not sink.store.unsettled and (tmp_path / JOURNAL).stat().st_size == 0 and sink.tick_interval == 0
    sink.stop()
    committing = ReplicaSink(path=str(tmp_path / "b"), fsync=True, settle="commit")
    committing.start(StageContext("replica-sink"))
    feed(committing, [sender.layout()] + sender.full_epoch(resync=True) + sender.epoch_batches(sender.dirty(4)))
    assert committing.tick_interval == 0 and not committing.store.unsettled
    committing.stop()


# ---- bounds: memory, disk, one writer, one stream (issue 10) ------------------------------

def with_identity(batches: list[Batch], identity: str) -> list[Batch]:
    """The batches as deframe emits them from a version 2 stream: control batches name the stream."""
    return [b.with_(meta={**b.meta, "stream_id": identity}) if b.is_control else b for b in batches]


A, B = "a" * 32, "b" * 32


def test_a_second_sink_on_the_same_replica_is_refused_and_readers_still_work(tmp_path):
    sender = Sender()
    first = started_sink(tmp_path)
    feed(first, [sender.layout()] + sender.full_epoch())
    with pytest.raises(ReplicaLocked, match="another receiver is writing it"):
        started_sink(tmp_path)
    with pytest.raises(ReplicaLocked):
        ReplicaStore(tmp_path, fsync=False)
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)     # readers take no lock
    assert verify_replica(tmp_path).ok
    first.stop()
    second = started_sink(tmp_path)        # the lock went with the first sink
    assert second.store.epoch == 1
    second.stop()


def test_a_forked_child_does_not_keep_the_replica_locked(tmp_path):
    lock = ReplicaLock(tmp_path)
    ready, tell = os.pipe()
    child = os.fork()
    if child == 0:                      # the child holds a copy of every descriptor... except the lock's
        os.write(tell, b"x")            # (the fork hooks have run once os.fork returns here)
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        lock.release()
        ReplicaLock(tmp_path).release()     # free although the child still runs
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(tell)


def test_zero_entries_cost_entries_not_pages(tmp_path):
    sink = started_sink(tmp_path)
    many = 100_000
    regions = [{"name": "big", "start": 0, "first_page": 0, "npages": many}]
    feed(sink, [Batch.control(Flag.LAYOUT, 1, page_size=PAGE, regions=regions)])
    numbers = np.arange(many, dtype=np.uint64)
    zero = Batch(format=PAGES, epoch=1, page_size=PAGE, page_numbers=numbers,
                 kinds=np.full(many, PageKind.ZERO, np.uint8),
                 data=np.broadcast_to(np.zeros(PAGE, np.uint8), (many, PAGE)))    # no memory behind it
    feed(sink, [zero])
    assert sink.pending.cost < 4 * many * 8 < many * PAGE // 100
    digest = combine_digests(numbers, np.full(many, zero_page_digest(PAGE), np.uint64))
    feed(sink, [Batch.control(Flag.EPOCH_END, 1, page_size=PAGE, pages=many, digest=digest)])
    assert sink.counters["epochs_committed"] == 1
    sink.stop()


def test_an_lz4_payload_claiming_gigabytes_is_corrupt_data_and_the_sink_survives(tmp_path):
    sender = Sender("native+zstd")
    sink = started_sink(tmp_path, on_error="resync")
    feed(sink, [sender.layout()] + sender.full_epoch())
    batch = next(b for b in sender.epoch_batches(sender.dirty(4)) if not b.is_control)
    claim = int(2.3 * (1 << 30))
    forged = batch.with_(meta={**batch.meta, "codec": "native+lz4", "raw_size": claim},
                         offsets=np.linspace(0, claim, batch.npages + 1).astype(np.uint64))
    feed(sink, [forged])
    assert "decompress to" in sink.pending.doomed
    sink.stop()


def test_an_epoch_larger_than_the_memory_budget_spills_to_disk_and_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(replica, "SPILL_BYTES", 3 * PAGE)
    sender = Sender()
    sink = started_sink(tmp_path)
    batches = [sender.layout()] + sender.full_epoch()
    feed(sink, batches[:-1])
    assert sink.pending.spilled and (tmp_path / replica.SPILL).exists()
    assert sink.pending.held <= 3 * PAGE + PAGE * 5 + replica.BATCH_COST * 2
    feed(sink, batches[-1:])
    assert sink.counters["epochs_committed"] == 1 and sink.counters["epochs_spilled"] == 1
    assert not (tmp_path / replica.SPILL).exists()
    feed(sink, sender.epoch_batches(sender.dirty(20)))      # a delta epoch, spilled too, on top
    np.testing.assert_array_equal(replica_memory(tmp_path), sender.memory)
    sink.stop()


def test_a_layout_beyond_max_pages_or_the_free_disk_is_refused_before_allocating(tmp_path):
    sink = started_sink(tmp_path, max_pages=1000)
    with pytest.raises(CorruptData, match="exceed the limit of 1000"):
        feed(sink, [Batch.control(Flag.LAYOUT, 1, page_size=PAGE,
                                  regions=[{"name": "x", "start": 0, "first_page": 0, "npages": 1001}])])
    sink.stop()
    sink = started_sink(tmp_path, max_pages=1 << 40)
    huge = disk_free_bytes(tmp_path) // PAGE + 1000    # sparse, but more than the disk could ever hold
    with pytest.raises(CorruptData, match="the disk has .* free"):
        feed(sink, [Batch.control(Flag.LAYOUT, 1, page_size=PAGE,
                                  regions=[{"name": "x", "start": 0, "first_page": 0, "npages": huge}])])
    sink.stop()
    assert not (tmp_path / IMAGE).exists()


def test_a_resync_epoch_that_does_not_cover_its_layout_is_discarded(tmp_path):
    sender = Sender()
    sink = started_sink(tmp_path, bus=(bus := Bus()))
    feed(sink, [sender.layout()] + sender.full_epoch())
    partial = sender.epoch_batches(sender.dirty(3))
    feed(sink, [b.with_(flags=b.flags | Flag.RESYNC) for b in partial])
    assert sink.counters["epochs_discarded"] == 1 and read_manifest(tmp_path)["epoch"] == 1
    assert any("must carry every page of its layout" in w for w in bus.warnings())
    sink.stop()


def test_a_foreign_stream_is_refused_while_the_followed_one_is_live(tmp_path):
    ours, theirs = Sender(seed=1), Sender(seed=2)
    sink = started_sink(tmp_path, bus=(bus := Bus()))
    feed(sink, with_identity([ours.layout()] + ours.full_epoch(), A))
    assert read_manifest(tmp_path)["stream_id"] == A
    theirs.epoch = 999_998
    feed(sink, with_identity([theirs.layout()] + theirs.full_epoch(resync=True), B))     # injected baseline
    assert sink.counters["epochs_refused"] == 1 and read_manifest(tmp_path)["epoch"] == 1
    assert sink.in_sync and any("is not the stream" in w for w in bus.warnings())
    feed(sink, with_identity(ours.epoch_batches(ours.dirty(5)), A))      # the real sender goes on
    assert read_manifest(tmp_path)["epoch"] == 2
    np.testing.assert_array_equal(replica_memory(tmp_path), ours.memory)
    sink.stop()


def test_a_new_stream_is_followed_once_the_sink_asked_for_it_or_the_old_one_ended(tmp_path):
    ours, restarted = Sender(seed=1), Sender(seed=2)
    sink = started_sink(tmp_path)
    feed(sink, with_identity([ours.layout()] + ours.full_epoch(), A))
    feed(sink, with_identity([Batch.control(Flag.END_OF_STREAM, 1, page_size=PAGE)], A))
    feed(sink, with_identity([restarted.layout()] + restarted.full_epoch(), B))
    assert read_manifest(tmp_path)["stream_id"] == B and sink.stream_id == B
    sink.in_sync = False                 # out of sync (it asks for a resync): any baseline is welcome
    third = Sender(seed=3)
    feed(sink, with_identity([third.layout()] + third.full_epoch(), A))
    assert read_manifest(tmp_path)["stream_id"] == A
    np.testing.assert_array_equal(replica_memory(tmp_path), third.memory)
    sink.stop()


def test_a_synthetic_tracker_stream_of_repeated_deltas_commits_every_epoch_exactly(tmp_path):
    """test-src resync=true numbers its checkpoints from 1 like a tracker; every delta epoch applies onto
    the previous one (an epoch-0 baseline once left the store "empty" and the next commit wiped it)."""
    from pipeline.pipeline import Pipeline
    from stages.common.replica_store import verify_replica

    result = Pipeline.parse(f"test-src pattern=counter resync=true pages=8 epochs=4 ! classify ! xor-delta ! rle "
                            f"! replica-sink name=sink path={tmp_path}").run(mode="inline", timeout=60)
    counters = result.statistics[("sink", 0)]["counters"]
    assert counters["epochs_committed"] == 4 and counters["epochs_discarded"] == 0
    assert verify_replica(tmp_path).ok
    pages = load_replica(tmp_path)["test"].reshape(8, -1)
    assert np.array_equal(pages[:, :8].view("<u8").ravel(), np.arange(8))       # page numbers
    assert np.all(pages[:, 8:16].view("<u8").ravel() == 4) and not pages[:, 16:].any()   # the last epoch, 4
