"""The replica on disk: atomic commits, journal recovery, loading and verification."""
from __future__ import annotations

import ctypes
import errno
import json
import multiprocessing
import os
import shutil
import signal
import time

import numpy as np
import pytest

from pipeline.batch import PageKind
from pipeline.errors import ReplicaError
from stages.common import replica_store
from stages.codecs import get_codec
from stages.common.pages import combine_digests, digest_pages
from stages.common.layout import Layout
from stages.common.replica_store import (DIGESTS, IMAGE, JOURNAL, MANIFEST, MANIFEST_TEMPORARY, ReplicaStore,
                                         load_replica, read_manifest, replica_layout, verify_replica, whole_pages)

PAGE = 4096
REGIONS = [{"name": "heap", "start": 0x10000, "first_page": 0, "npages": 6},
           {"name": "stack", "start": 0x90000, "first_page": 8, "npages": 2}]


def layout(regions=REGIONS, page_size=PAGE) -> Layout:
    return replica_layout(page_size, regions, max_pages=1 << 20)


def filled(page_numbers, value: int, page_size=PAGE) -> np.ndarray:
    pages = np.empty((len(page_numbers), page_size), dtype=np.uint8)
    pages[:] = (np.arange(page_size) + value)[None, :] % 251
    pages[:, 0] = np.asarray(page_numbers) % 256
    return pages


def commit(store: ReplicaStore, epoch: int, page_numbers, value: int, the_layout=None) -> np.ndarray:
    page_numbers = np.asarray(page_numbers, dtype=np.uint64)
    pages = filled(page_numbers, value)
    digests = digest_pages(pages)
    store.commit(epoch, the_layout or layout(), page_numbers, [whole_pages(pages)], digests,
                 combine_digests(page_numbers, digests))
    return pages


ALL_PAGES = [0, 1, 2, 3, 4, 5, 8, 9]


def test_committed_epoch_loads_back_per_region(tmp_path):
    store = ReplicaStore(tmp_path, fsync=True)
    assert store.is_empty
    first = commit(store, 1, ALL_PAGES, 7)
    second = commit(store, 2, [1, 9], 9)
    store.close()

    regions = load_replica(tmp_path)
    assert sorted(regions) == ["heap", "stack"]
    heap = regions["heap"].reshape(6, PAGE)
    np.testing.assert_array_equal(heap[[0, 2, 3, 4, 5]], first[[0, 2, 3, 4, 5]])
    np.testing.assert_array_equal(heap[1], second[0])
    stack = regions["stack"].reshape(2, PAGE)
    np.testing.assert_array_equal(stack[0], first[6])
    np.testing.assert_array_equal(stack[1], second[1])
    manifest = read_manifest(tmp_path)
    assert manifest["epoch"] == 2 and manifest["page_size"] == PAGE
    assert os.path.getsize(tmp_path / JOURNAL) == 0   # kept open between commits, empty when none is running
    assert ReplicaStore(tmp_path).recovered_journal == "none"


def test_reopened_store_resumes_at_last_epoch(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    commit(store, 2, [3], 2)
    store.close()
    reopened = ReplicaStore(tmp_path)
    assert reopened.epoch == 2 and reopened.layout == layout()
    np.testing.assert_array_equal(reopened.read_pages(np.array([3], dtype=np.uint64), PAGE), filled([3], 2))


def test_verify_accepts_intact_replica_and_names_a_damaged_page(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 3)
    store.close()
    report = verify_replica(tmp_path)
    assert report.ok and report.epoch == 1 and report.pages == 8

    with open(tmp_path / IMAGE, "r+b") as image:
        image.seek(4 * PAGE + 100)
        image.write(b"\xff")
    damaged = verify_replica(tmp_path)
    assert not damaged.ok
    assert damaged.bad_pages == [4]


def test_verify_detects_tampered_digest_file(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 3)
    store.close()
    digests = np.fromfile(tmp_path / DIGESTS, dtype="<u8")
    digests[5] ^= 1
    digests.tofile(tmp_path / DIGESTS)
    report = verify_replica(tmp_path)
    assert not report.ok and 5 in report.bad_pages


def test_verify_reports_missing_image(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 3)
    store.close()
    (tmp_path / IMAGE).unlink()
    report = verify_replica(tmp_path)
    assert not report.ok and IMAGE in report.problems[0]


def test_crash_during_first_commit_leaves_an_empty_replica(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 3)
    store.close()
    (tmp_path / MANIFEST).unlink()      # died before the first manifest was written
    reopened = ReplicaStore(tmp_path)
    assert reopened.is_empty and reopened.recovered_journal == "none"
    with pytest.raises(ReplicaError, match="nothing committed"):
        load_replica(tmp_path)
    commit(reopened, 1, ALL_PAGES, 4)
    np.testing.assert_array_equal(reopened.read_pages(np.array([0, 9], dtype=np.uint64), PAGE),
                                  filled([0, 9], 4))


def journal_epoch_2(store: ReplicaStore, path, page_numbers, encoding, pages: np.ndarray) -> None:
    """Write epoch 2's journal (``encoding`` makes ``pages``) and stop there, as a receiver killed
    between writing the journal and applying it would."""
    page_numbers = np.asarray(page_numbers, dtype=np.uint64)
    digests = digest_pages(pages)
    image_digest = store._next_image_digest(layout(), page_numbers, digests, combine_digests(page_numbers, digests))
    manifest = dict(read_manifest(path), epoch=2, image_digest=f"{image_digest:#018x}")
    store._write_journal(manifest, page_numbers, [encoding], digests)


def test_complete_journal_is_replayed_on_open(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    pages = filled([2, 8], 5)
    page_numbers = np.array([2, 8], dtype=np.uint64)
    journal_epoch_2(store, tmp_path, page_numbers, whole_pages(pages), pages)
    store.close()

    reopened = ReplicaStore(tmp_path)
    assert reopened.recovered_journal == "replayed"
    assert reopened.epoch == 2
    np.testing.assert_array_equal(reopened.read_pages(page_numbers, PAGE), pages)
    assert not (tmp_path / JOURNAL).exists()


def test_delta_journal_replays_over_a_half_applied_image(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    before = commit(store, 1, ALL_PAGES, 1)
    page_numbers = np.array([0, 4, 8], dtype=np.uint64)
    cached = before[[0, 4, 6]].copy()
    after = cached.copy()
    after[:, 10:20] = 0xAB
    encoding = get_codec("native").encode(after, cached)
    assert (encoding.kinds == PageKind.DELTA).all()
    journal_epoch_2(store, tmp_path, page_numbers, encoding, after)
    # The receiver died while applying: the first page got its new bytes, the others not yet.
    with open(tmp_path / IMAGE, "r+b") as image:
        image.seek(0)
        image.write(after[0].tobytes())
    store.close()

    reopened = ReplicaStore(tmp_path)
    assert reopened.recovered_journal == "replayed" and reopened.epoch == 2
    np.testing.assert_array_equal(reopened.read_pages(page_numbers, PAGE), after)
    assert verify_replica(tmp_path).ok


def test_readers_see_a_pending_commit_without_touching_the_files(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    pages = filled([2, 8], 5)
    journal_epoch_2(store, tmp_path, [2, 8], whole_pages(pages), pages)   # being applied now
    store.close()

    regions = load_replica(tmp_path)
    np.testing.assert_array_equal(regions["heap"].reshape(6, PAGE)[2], pages[0])
    np.testing.assert_array_equal(regions["stack"].reshape(2, PAGE)[0], pages[1])
    report = verify_replica(tmp_path)
    assert not report.ok and "epoch 2 was interrupted" in report.problems[0]
    assert (tmp_path / JOURNAL).exists() and read_manifest(tmp_path)["epoch"] == 1   # untouched


def test_truncated_journal_is_discarded_and_replica_unchanged(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    before = commit(store, 1, ALL_PAGES, 1)
    pages = filled([2], 5)
    store._write_journal(dict(read_manifest(tmp_path), epoch=2), np.array([2], dtype=np.uint64),
                         [whole_pages(pages)], digest_pages(pages))
    store.close()
    size = os.path.getsize(tmp_path / JOURNAL)
    with open(tmp_path / JOURNAL, "r+b") as journal:
        journal.truncate(size - 5)

    reopened = ReplicaStore(tmp_path)
    assert reopened.recovered_journal == "discarded"
    assert reopened.epoch == 1
    np.testing.assert_array_equal(reopened.read_pages(np.array([2], dtype=np.uint64), PAGE), before[[2]])


def test_flipped_byte_in_journal_is_discarded(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    pages = filled([2], 5)
    store._write_journal(dict(read_manifest(tmp_path), epoch=2), np.array([2], dtype=np.uint64),
                         [whole_pages(pages)], digest_pages(pages))
    store.close()
    with open(tmp_path / JOURNAL, "r+b") as journal:
        journal.seek(200)
        byte = journal.read(1)
        journal.seek(200)
        journal.write(bytes([byte[0] ^ 0x10]))
    assert ReplicaStore(tmp_path).recovered_journal == "discarded"
    assert verify_replica(tmp_path).ok


def test_layout_growth_extends_image(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    grown = layout(REGIONS + [{"name": "mmap", "start": 0xA0000, "first_page": 10, "npages": 3}])
    pages = commit(store, 2, [10, 11, 12], 4, the_layout=grown)
    store.close()
    regions = load_replica(tmp_path)
    np.testing.assert_array_equal(regions["mmap"].reshape(3, PAGE), pages)
    assert verify_replica(tmp_path).ok


def test_manifest_swaps_with_a_spare_file_that_nothing_reads(tmp_path):
    store = ReplicaStore(tmp_path, fsync=True)
    for epoch in range(1, 5):
        commit(store, epoch, ALL_PAGES if epoch == 1 else [epoch], epoch)
        assert read_manifest(tmp_path)["epoch"] == epoch
    store.close()
    if replica_store._RENAMEAT2 is not None:   # swapped out, not deleted: the next commit writes into it
        assert json.loads((tmp_path / MANIFEST_TEMPORARY).read_text())["epoch"] == 3
    (tmp_path / MANIFEST_TEMPORARY).write_text("{not a manifest")
    reopened = ReplicaStore(tmp_path)
    assert reopened.epoch == 4 and reopened.recovered_journal == "none"
    assert not (tmp_path / MANIFEST_TEMPORARY).exists()
    commit(reopened, 5, [5], 5)
    reopened.close()
    assert read_manifest(tmp_path)["epoch"] == 5 and verify_replica(tmp_path).ok


def _renameat2_failing_with(error: int):
    def renameat2(*args) -> int:
        ctypes.set_errno(error)
        return -1
    return renameat2


@pytest.mark.parametrize("renameat2", [None, _renameat2_failing_with(errno.EINVAL)])
def test_manifest_is_renamed_into_place_where_it_cannot_be_swapped(tmp_path, monkeypatch, renameat2):
    monkeypatch.setattr(replica_store, "_RENAMEAT2", renameat2)
    store = ReplicaStore(tmp_path, fsync=False)
    for epoch in range(1, 4):
        commit(store, epoch, ALL_PAGES if epoch == 1 else [epoch], epoch)
        assert read_manifest(tmp_path)["epoch"] == epoch
    store.close()
    assert ReplicaStore(tmp_path).epoch == 3 and verify_replica(tmp_path).ok


def test_a_spare_manifest_file_replaced_behind_the_store_is_never_swapped_in(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    commit(store, 2, [2], 2)
    foreign = tmp_path / "foreign"
    foreign.write_text("{not a manifest")
    os.replace(foreign, tmp_path / MANIFEST_TEMPORARY)
    commit(store, 3, [3], 3)
    commit(store, 4, [4], 4)
    store.close()
    assert read_manifest(tmp_path)["epoch"] == 4 and verify_replica(tmp_path).ok


def test_a_journal_deleted_behind_the_store_is_created_again(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    commit(store, 2, [2], 2)
    (tmp_path / JOURNAL).unlink()
    commit(store, 3, [3], 3)
    assert (tmp_path / JOURNAL).exists() and os.path.getsize(tmp_path / JOURNAL) == 0
    store.close()
    assert ReplicaStore(tmp_path).epoch == 3


@pytest.mark.parametrize("regions, message", [
    ([{"name": "a", "start": 0, "first_page": 0, "npages": 4},
      {"name": "b", "start": 0, "first_page": 3, "npages": 4}], "overlap"),
    ([{"name": "a", "start": 0, "first_page": -1, "npages": 4}], "negative"),
    ([{"name": "a", "first_page": 0, "npages": 4}], "malformed"),
    ("not a list", "must be a list"),
    ([{"name": "a", "start": 0, "first_page": 0, "npages": 1 << 40}], "exceed the limit"),
])
def test_bad_layout_is_refused(regions, message):
    with pytest.raises(ReplicaError, match=message):
        replica_layout(PAGE, regions, max_pages=1 << 20)


@pytest.mark.parametrize("page_size", [0, 1000, 3 * 4096, 1 << 20, "4096"])
def test_bad_page_size_is_refused(page_size):
    with pytest.raises(ReplicaError, match="page size"):
        replica_layout(page_size, REGIONS, max_pages=1 << 20)


def test_layout_flags_page_numbers_in_holes_and_beyond():
    mask = layout().outside(np.array([0, 5, 6, 7, 8, 9, 10, 1 << 60], dtype=np.uint64))
    assert mask.tolist() == [False, False, True, True, False, False, True, True]


def test_layout_without_holes_flags_page_numbers_before_and_beyond():
    adjacent = layout([{"name": "a", "start": 0, "first_page": 2, "npages": 3},
                       {"name": "b", "start": 0, "first_page": 5, "npages": 3}])
    mask = adjacent.outside(np.array([0, 1, 2, 5, 7, 8, 1 << 60], dtype=np.uint64))
    assert mask.tolist() == [True, True, False, False, False, True, True]


def test_duplicate_region_names_get_unique_keys(tmp_path):
    twins = [{"name": "[anon]", "start": 0x1000, "first_page": 0, "npages": 1},
             {"name": "[anon]", "start": 0x8000, "first_page": 1, "npages": 1}]
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, [0, 1], 2, the_layout=layout(twins))
    store.close()
    assert sorted(load_replica(tmp_path)) == ["[anon]@0x1000", "[anon]@0x8000"]


def test_empty_or_foreign_directory_is_refused(tmp_path):
    with pytest.raises(ReplicaError, match="nothing committed"):
        load_replica(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ReplicaError, match="not a pagepipe-replica manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{truncated")
    with pytest.raises(ReplicaError, match="unreadable"):
        read_manifest(tmp_path)


def _commit_forever(path: str, npages: int) -> None:
    """Child process: commit baseline epochs 1, 2, 3, ... where every byte of epoch k is k % 256."""
    store = ReplicaStore(path, fsync=False)
    the_layout = replica_layout(PAGE, [{"name": "all", "start": 0, "first_page": 0, "npages": npages}],
                                       max_pages=npages)
    page_numbers = np.arange(npages, dtype=np.uint64)
    epoch = store.epoch
    while True:
        epoch += 1
        pages = np.full((npages, PAGE), epoch % 256, dtype=np.uint8)
        digests = digest_pages(pages)
        store.commit(epoch, the_layout, page_numbers, [whole_pages(pages)], digests,
                     combine_digests(page_numbers, digests))


@pytest.mark.parametrize("delay", [0.05, 0.17, 0.31])
def test_store_killed_mid_commit_restarts_at_one_committed_epoch(tmp_path, delay):
    npages = 512
    child = multiprocessing.get_context("spawn").Process(target=_commit_forever, args=(str(tmp_path), npages))
    child.start()
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / MANIFEST).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    store = ReplicaStore(tmp_path)
    assert store.epoch >= 1
    image = store.read_pages(np.arange(npages, dtype=np.uint64), PAGE)
    assert np.all(image == store.epoch % 256), "replica mixes two epochs"
    store.close()
    assert verify_replica(tmp_path).ok


def _commit_many(path: str, epochs: int) -> None:
    """Child process: commit epochs 2.. over a replica, every page of epoch k filled with k, one
    every millisecond (25 times the demo's rate; a reader needs a moment without a commit)."""
    store = ReplicaStore(path, fsync=False)
    page_numbers = np.array(ALL_PAGES, dtype=np.uint64)
    for epoch in range(2, epochs + 1):
        pages = np.full((len(ALL_PAGES), PAGE), epoch, dtype=np.uint8)
        digests = digest_pages(pages)
        store.commit(epoch, layout(), page_numbers, [whole_pages(pages)], digests,
                     combine_digests(page_numbers, digests))
        time.sleep(0.001)


def test_load_while_a_receiver_commits_sees_one_epoch(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    page_numbers = np.array(ALL_PAGES, dtype=np.uint64)
    pages = np.full((len(ALL_PAGES), PAGE), 1, dtype=np.uint8)
    digests = digest_pages(pages)
    store.commit(1, layout(), page_numbers, [whole_pages(pages)], digests, combine_digests(page_numbers, digests))
    store.close()
    writer = multiprocessing.get_context("spawn").Process(target=_commit_many, args=(str(tmp_path), 150))
    writer.start()
    try:
        seen = set()
        while writer.is_alive():
            regions = load_replica(tmp_path)
            values = np.unique(np.concatenate([regions["heap"], regions["stack"]]))
            assert values.size == 1, f"a mix of epochs {values}"
            seen.add(int(values[0]))
    finally:
        writer.join()
    assert seen


@pytest.mark.parametrize("codec_name", ["native", "xbzrle", "xen"])
def test_journal_replay_relies_on_encodings_being_idempotent(codec_name):
    """Applying an epoch's encodings onto pages that already have them changes nothing (what a
    replay over a half-applied image does), for every run format."""
    rng = np.random.default_rng(4)
    old = rng.integers(0, 256, (16, PAGE), dtype=np.uint8)
    new = old.copy()
    for row in range(16):
        start = int(rng.integers(0, PAGE - 300))
        new[row, start:start + int(rng.integers(1, 300))] = rng.integers(0, 256, dtype=np.uint8)
    new[5] = rng.integers(0, 256, PAGE, dtype=np.uint8)        # dense change: FULL or a long delta
    codec = get_codec(codec_name)
    encoding = codec.encode(new, old.copy())
    once = old.copy()
    codec.decode(encoding, once)
    twice = once.copy()
    codec.decode(encoding, twice)
    np.testing.assert_array_equal(once, new)
    np.testing.assert_array_equal(twice, new)


STACK_GONE = [REGIONS[0]]


def test_pages_of_a_dropped_region_are_zeroed_and_their_blocks_freed(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    blocks_before = os.stat(tmp_path / IMAGE).st_blocks
    commit(store, 2, [0], 2, the_layout=layout(STACK_GONE))
    store.close()
    image = np.fromfile(tmp_path / IMAGE, dtype=np.uint8).reshape(-1, PAGE)
    assert not image[8:10].any()
    zero = digest_pages(np.zeros((1, PAGE), np.uint8))[0]
    assert (np.fromfile(tmp_path / DIGESTS, dtype="<u8")[8:10] == zero).all()
    assert os.stat(tmp_path / IMAGE).st_blocks < blocks_before   # ext4, xfs, tmpfs, btrfs punch holes
    assert verify_replica(tmp_path).ok and sorted(load_replica(tmp_path)) == ["heap"]


def test_dropped_pages_are_zeroed_where_holes_cannot_be_punched(tmp_path, monkeypatch):
    monkeypatch.setattr(replica_store, "_FALLOCATE", None)
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    commit(store, 2, [0], 2, the_layout=layout(STACK_GONE))
    store.close()
    assert not np.fromfile(tmp_path / IMAGE, dtype=np.uint8).reshape(-1, PAGE)[8:10].any()


def test_a_region_that_reuses_dropped_page_numbers_starts_as_zeros(tmp_path):
    """Pages a later layout brings back, and no epoch has sent since, read as never-written memory."""
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 1)
    commit(store, 2, [0], 2, the_layout=layout(STACK_GONE))
    new_stack = [REGIONS[0], {"name": "stack", "start": 0xA0000, "first_page": 8, "npages": 2}]
    commit(store, 3, [9], 3, the_layout=layout(new_stack))
    store.close()
    stack = load_replica(tmp_path)["stack"].reshape(2, PAGE)
    assert not stack[0].any()
    np.testing.assert_array_equal(stack[1], filled([9], 3)[0])
    assert verify_replica(tmp_path).ok


# ---- every failure a ReplicaError; one writer (issue 10) ----------------------------

def test_an_image_that_cannot_be_mapped_is_a_replica_error_naming_the_path(tmp_path, monkeypatch):
    store = ReplicaStore(tmp_path, fsync=False)

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(np, "memmap", no_memory)
    with pytest.raises(ReplicaError, match=f"replica {tmp_path}: cannot map the image .*allocate memory"):
        commit(store, 1, ALL_PAGES, 7)
    store.close()


def test_a_full_disk_during_a_commit_is_a_replica_error(tmp_path, monkeypatch):
    store = ReplicaStore(tmp_path, fsync=False)
    commit(store, 1, ALL_PAGES, 7)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(replica_store, "_write_all", disk_full)
    with pytest.raises(ReplicaError, match="cannot write the journal .*No space left"):
        commit(store, 2, [1], 9)
    store.close()
    assert read_manifest(tmp_path)["epoch"] == 1


def test_a_layout_beyond_max_pages_or_the_disk_is_refused_before_any_file_grows(tmp_path):
    store = ReplicaStore(tmp_path, fsync=False, max_pages=1 << 40)
    huge = Layout.from_untrusted(PAGE, [{"name": "x", "start": 0, "first_page": 0,
                                         "npages": replica_store.disk_free_bytes(tmp_path) // PAGE + 1}],
                                 max_pages=1 << 40)
    with pytest.raises(ReplicaError, match="the disk has"):
        store.check_room(huge)
    with pytest.raises(ReplicaError, match="exceeds max-pages=100"):
        ReplicaStore(tmp_path / "small", fsync=False, max_pages=100).check_room(layout([dict(REGIONS[0], npages=101)]))
    store.close()
    assert not (tmp_path / IMAGE).exists()


def test_one_writer_at_a_time_and_readers_alongside(tmp_path):
    writer = ReplicaStore(tmp_path, fsync=False)
    commit(writer, 1, ALL_PAGES, 7)
    assert replica_store.replica_locked(tmp_path)
    with pytest.raises(replica_store.ReplicaLocked, match="another receiver is writing it"):
        ReplicaStore(tmp_path, fsync=False)
    assert load_replica(tmp_path)["stack"].size == 2 * PAGE and verify_replica(tmp_path).ok
    writer.close()
    assert not replica_store.replica_locked(tmp_path)
    ReplicaStore(tmp_path, fsync=False).close()


def test_a_commit_left_to_settle_is_durable_by_its_journal_and_settles_later(tmp_path):
    store = ReplicaStore(tmp_path, fsync=True, settle_later=True)
    commit(store, 1, ALL_PAGES, 1)              # the first commit has no journal: settled at once
    assert not store.unsettled
    second = commit(store, 2, [1, 9], 2)
    assert store.unsettled and os.path.getsize(tmp_path / JOURNAL) > 0
    assert read_manifest(tmp_path)["epoch"] == 2
    assert verify_replica(tmp_path).ok          # applied, only its flushes are pending
    np.testing.assert_array_equal(load_replica(tmp_path)["heap"].reshape(6, PAGE)[1], second[0])
    crashed = tmp_path.parent / f"{tmp_path.name}-crashed"
    shutil.copytree(tmp_path, crashed)          # the files as a crash before settling leaves them
    reopened = ReplicaStore(crashed)            # the journal is replayed
    assert reopened.recovered_journal == "replayed" and reopened.epoch == 2 and not reopened.unsettled
    reopened.close()
    np.testing.assert_array_equal(load_replica(crashed)["heap"], load_replica(tmp_path)["heap"])
    commit(store, 3, [2], 3)
    commit(store, 4, [3], 4)                    # settles epoch 3 first
    store.settle()
    assert not store.unsettled and os.path.getsize(tmp_path / JOURNAL) == 0
    commit(store, 5, [4], 5)
    store.close()                               # settles too
    assert os.path.getsize(tmp_path / JOURNAL) == 0 and read_manifest(tmp_path)["epoch"] == 5


def test_epoch_zero_is_refused_because_it_is_the_empty_replicas_number(tmp_path):
    """Committing epoch 0 would leave the store looking empty, and the next commit would discard its image."""
    store = ReplicaStore(tmp_path, fsync=False)
    with pytest.raises(ReplicaError, match="cannot commit epoch 0: checkpoints are numbered from 1"):
        commit(store, 0, ALL_PAGES, 7)
    assert store.is_empty
    store.close()
