"""region-src: checkpoints of the caller's own buffers, in userfaultfd and digest mode."""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading

import numpy as np
import pytest

from pipeline.batch import Flag
from pipeline.errors import ConfigError, TrackerError
from pipeline.stage import StageContext
from stages.trackers.region import PAGE_SIZE, RegionSource, tracked_array
from tracker_streams import epoch_page_numbers, replay

MODES = ["uffd", "digest"]


@contextlib.contextmanager
def running(source: RegionSource, keep_batches: bool = True):
    """Start the source with a consumer thread; yields the list the batches land in (copies if not kept)."""
    warnings: list[str] = []
    source.start(StageContext("region-src", post=lambda kind, **f: warnings.append(f.get("message", ""))))
    batches, errors = [], []

    def consume():
        try:
            for batch in source.produce():
                if not keep_batches and batch.data is not None:
                    batch = batch.with_(data=batch.data.copy())
                batches.append(batch)
        except Exception as exc:  # handed to the test
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    source.warnings, source.consumer_errors = warnings, errors
    try:
        yield batches
    finally:
        source.close()
        consumer.join(timeout=10)
        source.stop()
    assert not consumer.is_alive()


def memory_pages(arrays) -> dict[int, bytes]:
    pages, first = {}, 0
    for array in arrays:
        raw = np.frombuffer(memoryview(array).cast("B"), np.uint8)
        padded = np.zeros(-(-raw.size // PAGE_SIZE) * PAGE_SIZE, np.uint8)
        padded[:raw.size] = raw
        for index, row in enumerate(padded.reshape(-1, PAGE_SIZE)):
            pages[first + index] = row.tobytes()
        first += len(padded) // PAGE_SIZE
    return pages


@pytest.mark.parametrize("mode", MODES)
def test_first_epoch_carries_every_page_then_only_written_pages(mode):
    memory = tracked_array((32, PAGE_SIZE))
    source = RegionSource(regions=memory, mode=mode)
    with running(source) as batches:
        assert source.checkpoint().pages == 32
        memory[3, 100] = 7
        memory[17, :] = 1
        info = source.checkpoint()
        empty = source.checkpoint()
    assert (info.epoch, info.pages, empty.pages) == (2, 2, 0)
    assert source.tracking_mode == mode
    assert epoch_page_numbers(batches, 1) == list(range(32))
    assert epoch_page_numbers(batches, 2) == [3, 17]
    assert epoch_page_numbers(batches, 3) == []
    pages, ends = replay(batches)
    assert pages == memory_pages([memory])
    assert [end.meta["pages"] for end in ends] == [32, 2, 0]
    assert batches[0].meta["tracking"] == mode


@pytest.mark.parametrize("copy_threads", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_replay_of_random_writes_equals_memory_in_every_epoch(mode, copy_threads):
    rng = np.random.default_rng(1)
    arrays = [tracked_array((300, PAGE_SIZE)), tracked_array(5 * PAGE_SIZE // 8, dtype=np.float64)]
    source = RegionSource(regions=arrays, mode=mode, batch_pages=64, copy_threads=copy_threads)
    with running(source) as batches:
        for _ in range(6):
            rows = rng.choice(300, size=rng.integers(0, 120), replace=False)
            arrays[0][rows, rng.integers(0, PAGE_SIZE)] += 1
            arrays[1][rng.integers(0, arrays[1].size, 3)] = rng.random(3)
            source.checkpoint()
    pages, ends = replay(batches, batch_pages=64)
    assert len(ends) == 6
    assert pages == memory_pages(arrays)
    regions = batches[0].meta["regions"]
    assert [(r["first_page"], r["npages"]) for r in regions] == [(0, 300), (300, 5)]


def test_regions_given_by_name_keep_their_names_in_the_layout():
    heap, table = tracked_array(2 * PAGE_SIZE), tracked_array(3 * PAGE_SIZE)
    source = RegionSource(regions={"heap": heap, "table": table})
    with running(source) as batches:
        source.checkpoint()
    regions = batches[0].meta["regions"]
    assert [(r["name"], r["first_page"], r["npages"]) for r in regions] == [("heap", 0, 2), ("table", 2, 3)]
    assert regions[1]["start"] == table.ctypes.data


def test_digest_mode_tracks_unaligned_buffers_with_a_partial_last_page():
    buffer = bytearray(b"x" * (3 * PAGE_SIZE + 100))
    source = RegionSource(regions=buffer)
    with running(source) as batches:
        source.checkpoint()
        buffer[3 * PAGE_SIZE + 5] = ord("y")
        source.checkpoint()
    assert source.tracking_mode == "digest"
    assert "not page aligned" in source.fallback_reason
    assert any("page digests" in message for message in source.warnings)
    assert epoch_page_numbers(batches, 2) == [3]
    pages, _ = replay(batches)
    assert pages == memory_pages([buffer])


@pytest.mark.parametrize("mode", MODES)
def test_staged_pages_are_copies_not_views_of_live_memory(mode):
    memory = tracked_array((4, PAGE_SIZE))
    source = RegionSource(regions=memory, mode=mode)
    with running(source) as batches:
        source.checkpoint()
        memory[:] = 9
        source.checkpoint()
        memory[:] = 5  # after the checkpoint: must not show in epoch 2
        source.checkpoint()
    epoch2 = [b for b in batches if b.epoch == 2 and b.npages]
    assert all(np.all(b.data == 9) and not np.shares_memory(b.data, memory) for b in epoch2)


@pytest.mark.parametrize("keep_batches", [True, False], ids=["downstream-keeps-slabs", "downstream-drops-slabs"])
def test_overflowing_the_staging_buffer_waits_for_downstream_and_loses_nothing(keep_batches):
    memory = tracked_array((200, PAGE_SIZE))
    source = RegionSource(regions=memory, staging=8 * PAGE_SIZE, batch_pages=4)
    with running(source, keep_batches=keep_batches) as batches:
        source.checkpoint()
        for value in range(1, 4):
            memory[::2, value] = value
            assert source.checkpoint().pages == 100
    assert not source.consumer_errors
    pages, ends = replay(batches, batch_pages=4)
    assert pages == memory_pages([memory])
    assert [end.meta["pages"] for end in ends] == [200, 100, 100, 100]


@pytest.mark.parametrize("mode", MODES)
def test_resync_carries_every_page_flagged_resync(mode):
    memory = tracked_array((10, PAGE_SIZE))
    source = RegionSource(regions=memory, mode=mode)
    with running(source) as batches:
        source.checkpoint()
        memory[2, 0] = 1
        source.request_resync()
        source.checkpoint()
        memory[4, 0] = 1
        source.checkpoint()
    assert epoch_page_numbers(batches, 2) == list(range(10))
    epoch2 = [b for b in batches if b.epoch == 2]
    assert epoch2[0].flags == Flag.LAYOUT, "a receiver starting over gets the layout again"
    assert all(b.flags & Flag.RESYNC for b in epoch2[1:])
    assert epoch_page_numbers(batches, 3) == [4]
    assert not any(b.flags & Flag.RESYNC for b in batches if b.epoch == 3)
    replay(batches)


def test_checkpoint_wait_returns_once_the_epoch_is_acknowledged():
    memory = tracked_array((2, PAGE_SIZE))
    source = RegionSource(regions=memory, mode="digest")
    with running(source):
        acknowledger = threading.Timer(0.05, source.acknowledged, args=(1,))
        acknowledger.start()
        assert source.checkpoint(wait=True, timeout=10).epoch == 1
        with pytest.raises(TrackerError, match="epoch 2 not acknowledged"):
            source.checkpoint(wait=True, timeout=0.01)
        acknowledger.join()


def test_max_unacked_holds_checkpoints_until_an_epoch_is_acknowledged():
    memory = tracked_array((2, PAGE_SIZE))
    source = RegionSource(regions=memory, mode="digest", max_unacked=2, ack_timeout="50ms")
    with running(source):
        assert [source.checkpoint().epoch for _ in range(2)] == [1, 2]
        with pytest.raises(TrackerError, match=r"2 epochs unacknowledged \(max-unacked=2\)"):
            source.checkpoint()
        source.ack_timeout = 10.0
        acknowledger = threading.Timer(0.05, source.acknowledged, args=(1,))
        acknowledger.start()
        assert source.checkpoint().epoch == 3          # released by the acknowledgement of epoch 1
        acknowledger.join()


def test_a_resync_request_releases_max_unacked_and_discards_the_epochs_in_flight():
    memory = tracked_array((2, PAGE_SIZE))
    source = RegionSource(regions=memory, mode="digest", max_unacked=1, ack_timeout="50ms")
    with running(source) as batches:
        source.checkpoint()
        source.request_resync()                          # epoch 1 will never be acknowledged
        assert source.checkpoint().epoch == 2
        with pytest.raises(TrackerError, match="1 epochs unacknowledged"):
            source.checkpoint()                          # the resync epoch itself is in flight
        source.acknowledged(2)
        assert source.checkpoint().epoch == 3
    ends = [b for b in batches if b.flags & Flag.EPOCH_END]
    assert [(b.epoch, bool(b.flags & Flag.RESYNC)) for b in ends] == [(1, False), (2, True), (3, False)]


@pytest.mark.parametrize("buffer,message", [
    (b"read only bytes" * 300, "read-only"),
    (np.zeros(10), None),  # fine: writable
    (42, "not a buffer"),
    (bytearray(), "empty"),
    (np.zeros((8, 1024))[:, ::2], "not contiguous"),
])
def test_buffers_that_cannot_be_tracked_are_rejected_naming_the_stage(buffer, message):
    source = RegionSource(regions=buffer, name="tracker7", mode="digest")
    if message is None:
        source.start(StageContext("region-src"))
        assert source.checkpoint().pages == 1
        source.stop()
        return
    with pytest.raises(TrackerError, match=f"tracker7: region0 .*{message}"):
        source.start(StageContext("region-src"))


def test_uffd_mode_rejects_unaligned_buffers():
    source = RegionSource(regions=bytearray(PAGE_SIZE + 1), mode="uffd")
    with pytest.raises(TrackerError, match="userfaultfd mode unavailable: region0 not page aligned"):
        source.start(StageContext("region-src"))


def test_auto_mode_falls_back_to_digests_where_userfaultfd_cannot_register():
    memory = tracked_array((4, PAGE_SIZE))
    first = RegionSource(regions=memory)
    second = RegionSource(regions=memory)  # the range is taken: UFFDIO_REGISTER says EBUSY
    with running(first), running(second) as batches:
        second.checkpoint()
        memory[1, 0] = 1
        second.checkpoint()
    assert (first.tracking_mode, second.tracking_mode) == ("uffd", "digest")
    assert "EBUSY" in second.fallback_reason
    assert batches[0].meta["tracking"] == "digest"
    assert epoch_page_numbers(batches, 2) == [1]


@pytest.mark.parametrize("mode", MODES)
def test_shared_file_mappings_are_tracked(tmp_path, mode):
    path = tmp_path / "backing"
    path.write_bytes(bytes(4 * PAGE_SIZE))
    with open(path, "r+b") as file:
        shared_file = mmap.mmap(file.fileno(), 0)
    source = RegionSource(regions=shared_file, mode=mode)
    with running(source) as batches:
        source.checkpoint()
        shared_file[PAGE_SIZE] = 1
        source.checkpoint()
    assert epoch_page_numbers(batches, 2) == [1]
    pages, _ = replay(batches)
    assert pages[1] == bytes(shared_file[PAGE_SIZE:2 * PAGE_SIZE])


def test_stop_ends_a_produce_that_waits_for_checkpoints():
    source = RegionSource(regions=tracked_array(PAGE_SIZE))
    source.start(StageContext("region-src"))
    stream = source.produce()
    source.checkpoint()
    first = [next(stream) for _ in range(3)]
    consumer = threading.Thread(target=lambda: first.extend(stream))
    consumer.start()
    source.stop()
    consumer.join(timeout=10)
    assert not consumer.is_alive()
    assert first[-1].flags & Flag.END_OF_STREAM
    with pytest.raises(TrackerError, match="after close"):
        source.checkpoint()


def test_missing_regions_is_a_config_error():
    with pytest.raises(ConfigError, match="needs regions="):
        RegionSource().checkpoint()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.mark.parametrize("mode", MODES)
def test_freed_region_fails_the_checkpoint_and_keeps_committed_epochs(mode):
    length = 37 * PAGE_SIZE
    address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    memory = np.frombuffer((ctypes.c_uint8 * length).from_address(address), np.uint8)
    source = RegionSource(regions=memory, mode=mode, name="freed")
    with running(source) as batches:
        source.checkpoint()
        memory[5] = 1
        source.checkpoint()
        del memory
        assert _libc.munmap(address, length) == 0
        with pytest.raises(TrackerError, match="freed: checkpoint of epoch 3 failed"):
            source.checkpoint()
        with pytest.raises(TrackerError, match="epoch 3 failed"):
            source.checkpoint()
    assert len(source.consumer_errors) == 1 and "epoch 3" in str(source.consumer_errors[0])
    ends = [b for b in batches if b.flags & Flag.EPOCH_END]
    assert [end.epoch for end in ends] == [1, 2]
    assert not any(b.epoch == 3 for b in batches)
