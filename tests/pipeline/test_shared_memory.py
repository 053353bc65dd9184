"""Shared-memory rings: slot allocation, forwarding, untrusted references, and batches that cross them intact."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import CorruptData
from pipeline.pipeline import Pipeline
from pipeline.shm import (LARGE_FRAME, TAG, Arena, ReceiveRing, RingMaps, SendRing, arena_name, forward_reference,
                          is_reference)
from stages_for_tests import read_record

LARGE = 2 * LARGE_FRAME


def message(fill: int, size: int = LARGE) -> list:
    return [b'{"header": 1}', np.full(size, fill, np.uint8).data, np.arange(4, dtype=np.uint64).data]


def test_packed_frames_come_back_identical_and_read_only(tmp_path):
    released = []
    sender = SendRing(str(tmp_path / "ring"), 8 * LARGE)
    receiver = ReceiveRing(str(tmp_path / "ring"), released.append)
    original = message(7)
    packed = sender.pack(original)
    assert len(packed) == 1 and is_reference(packed[0]) and len(packed[0]) < 200  # one small reference frame
    frames = receiver.unpack(packed)
    assert len(frames) == 3
    assert bytes(frames[0]) == original[0] and bytes(frames[1]) == bytes(original[1])
    assert bytes(frames[2]) == bytes(original[2])  # small frames travel in the message itself
    view = np.frombuffer(frames[1], dtype=np.uint8)
    assert not view.flags.writeable
    del frames
    assert released == []  # a view of the slot is still alive
    del view
    assert released == [0]


def test_ring_reuses_space_only_after_release_in_any_order_and_wraps(tmp_path):
    ring = SendRing(str(tmp_path / "ring"), 4 * LARGE)
    offsets = [int(np.frombuffer(ring.pack(message(i))[0][len(TAG):len(TAG) + 8], np.uint64)[0]) for i in range(4)]
    assert offsets == [0, LARGE, 2 * LARGE, 3 * LARGE]
    assert ring.pack(message(9)) is None  # full
    ring.release(LARGE)                    # out of order: the oldest slot still holds the tail
    assert ring.pack(message(9)) is None
    ring.release(0)
    assert ring.pack(message(9)) is not None and ring.used == 3 * LARGE  # slots 2, 3 and the new one
    with pytest.raises(CorruptData, match="unknown slot"):
        ring.release(12345)


@pytest.mark.parametrize("reference", [
    TAG + b"\x00" * 3,
    TAG + np.array([0, 1 << 40], np.uint64).tobytes() + np.array([0], np.uint32).tobytes(),
    TAG + np.array([0, 64], np.uint64).tobytes() + np.array([1], np.uint32).tobytes()
    + np.array([5], np.uint32).tobytes() + np.array([0, 8], np.uint64).tobytes(),
    TAG + np.array([0, 64], np.uint64).tobytes() + np.array([1], np.uint32).tobytes()
    + np.array([0], np.uint32).tobytes() + np.array([60, 8], np.uint64).tobytes(),
])
def test_malformed_references_are_corrupt_data(tmp_path, reference):
    SendRing(str(tmp_path / "ring"), 4096)
    receiver = ReceiveRing(str(tmp_path / "ring"), lambda offset: None)
    with pytest.raises(CorruptData, match="shared-memory reference"):
        receiver.unpack([reference])


def test_inline_frames_of_a_reference_are_bounds_checked(tmp_path):
    sender = SendRing(str(tmp_path / "ring"), 8 * LARGE)
    receiver = ReceiveRing(str(tmp_path / "ring"), lambda offset: None)
    (packed,) = sender.pack(message(3))
    for broken in (packed[:-5], packed + b"\x00" * 8, packed[:len(packed) - 40] + b"\xff" * 40):
        with pytest.raises(CorruptData, match="shared-memory reference"):
            receiver.unpack([broken])
    with pytest.raises(CorruptData, match="a reference is one"):
        receiver.unpack([packed, b"extra"])


BIG_BATCHES = "test-src epochs=3 pages=600 batch-pages=128 pattern=random"


def test_large_batches_cross_processes_through_rings_with_the_same_result_as_inline(tmp_path):
    results = []
    for mode in ("inline", "process"):
        path = tmp_path / f"{mode}.json"
        Pipeline.parse(f"{BIG_BATCHES} ! identity workers=2 ! shard-checker workers=3 ! recorder path={path}").run(
            mode=mode, timeout=60)
        results.append(read_record(path))
    assert results[0]["pages"] == results[1]["pages"] and len(results[0]["pages"]) == 1800


def test_a_receiver_holding_every_slot_does_not_deadlock_its_sender_nor_see_changed_data(tmp_path):
    inline, process = tmp_path / "inline.json", tmp_path / "process.json"
    Pipeline.parse(f"{BIG_BATCHES} ! hoarder path={inline}").run(mode="inline")
    Pipeline.parse(f"{BIG_BATCHES} ! hoarder path={process}").run(mode="process", max_inflight="2MiB", timeout=60)
    assert read_record(inline)["pages"] == read_record(process)["pages"]


def test_a_slot_that_would_cross_the_ring_end_starts_over_at_zero(tmp_path):
    size = 3 * LARGE // 2
    ring = SendRing(str(tmp_path / "ring"), 4 * LARGE)
    assert ring.pack(message(1, size)) is not None and ring.pack(message(2, size)) is not None
    assert ring.pack(message(3, size)) is None  # 1 x LARGE left at the end, not enough
    ring.release(0)
    packed = ring.pack(message(3, size))
    assert np.frombuffer(packed[0][len(TAG):len(TAG) + 8], np.uint64)[0] == 0


def _received_through_ring(tmp_path, fill: int):
    """A message written into ring r0.0.0.0 and unpacked by a first receiver; (receiver's maps, frames, releases)."""
    path = str(tmp_path / "r0.0.0.0")
    sender, released = SendRing(path, 8 * LARGE), []
    maps = RingMaps()
    frames = ReceiveRing(path, released.append, maps, lambda token: None).unpack(sender.pack(message(fill)))
    return maps, frames, released


def test_views_of_a_ring_are_forwarded_without_copy_and_the_slot_waits_for_the_last_holder(tmp_path):
    maps, frames, slot_released = _received_through_ring(tmp_path, 5)
    outgoing = [bytes(frames[0]), frames[1].data, frames[2]]  # what to_frames makes of a batch that kept its arrays
    located = maps.locate(outgoing)
    assert located == [(1, "r0.0.0.0", 0, LARGE)]
    forwarded = forward_reference(outgoing, located, token=7)
    assert len(forwarded) == 1 and is_reference(forwarded[0]) and len(forwarded[0]) < 200  # a reference, not the data
    held = {7: outgoing}                                # the forwarding worker holds its views ...
    del frames, outgoing
    tokens = []
    next_hop = ReceiveRing(str(tmp_path / "r1.0.0.0"), lambda offset: None, RingMaps(), tokens.append)
    received = next_hop.unpack(forwarded)
    assert bytes(received[1]) == bytes([5]) * LARGE and not np.frombuffer(received[1], np.uint8).flags.writeable
    del received
    assert tokens == [7] and slot_released == []        # ... until the next hop lets go
    held.pop(7)
    assert slot_released == [0]


def test_frames_outside_any_mapped_ring_are_not_forwarded(tmp_path):
    maps, frames, _ = _received_through_ring(tmp_path, 1)
    assert maps.locate([b"header", np.full(LARGE, 1, np.uint8).data]) is None  # a copy on the heap
    assert maps.locate([b"header", frames[1].data, np.full(LARGE, 1, np.uint8).data]) is None  # partly


@pytest.mark.parametrize("name,offset,message_part", [
    ("../r0.0.0.0", 0, "not a ring name"),
    ("passwd", 0, "not a ring name"),
    ("r9.9.9.9", 0, "cannot be opened"),
    ("r0.0.0.0", 8 * LARGE - 8, "out of bounds"),
])
def test_malformed_forward_references_are_corrupt_data(tmp_path, name, offset, message_part):
    SendRing(str(tmp_path / "r0.0.0.0"), 8 * LARGE)
    receiver = ReceiveRing(str(tmp_path / "r1.0.0.0"), lambda offset: None, RingMaps(), lambda token: None)
    reference = forward_reference([b"{}", b""], [(1, name, offset, LARGE)], token=1)
    with pytest.raises(CorruptData, match=message_part):
        receiver.unpack(reference)
    with pytest.raises(CorruptData, match="shared-memory reference"):
        receiver.unpack([reference[0][:-3]])


def test_a_hoarder_behind_pass_through_stages_holds_forwarded_slots_without_deadlock(tmp_path):
    inline, process = tmp_path / "inline.json", tmp_path / "process.json"
    chain = f"{BIG_BATCHES} ! identity ! identity ! hoarder"
    Pipeline.parse(f"{chain} path={inline}").run(mode="inline")
    Pipeline.parse(f"{chain} path={process}").run(mode="process", max_inflight="2MiB", timeout=60)
    assert read_record(inline)["pages"] == read_record(process)["pages"]


def test_arena_arrays_are_forwarded_by_reference_and_freed_when_the_last_view_goes(tmp_path):
    maps = RingMaps()
    arena = Arena(str(tmp_path), 0, 0, maps, chunk_bytes=4 * LARGE, limit_bytes=8 * LARGE)
    pages = arena.allocate((LARGE // 4096, 4096), np.uint8)
    pages[...] = 9                                      # the source writes its pages once, into shared memory
    outgoing = [b"header", memoryview(pages).cast("B")]
    located = maps.locate(outgoing)
    assert located == [(1, arena_name(0, 0, 0), 0, LARGE)]
    tokens = []
    receiver = ReceiveRing(str(tmp_path / "r0.0.0.0"), lambda offset: None, RingMaps(), tokens.append)
    received = receiver.unpack(forward_reference(outgoing, located, token=3))
    assert bytes(received[0]) == b"header" and bytes(received[1]) == bytes([9]) * LARGE
    del received
    assert tokens == [3] and arena.used == LARGE        # the sender still holds its views
    del pages, outgoing
    assert arena.used == 0


def test_arena_grows_by_chunks_up_to_its_limit_then_says_no(tmp_path):
    arena = Arena(str(tmp_path), 1, 2, RingMaps(), chunk_bytes=2 * LARGE, limit_bytes=4 * LARGE)
    held = [arena.allocate((LARGE,), np.uint8) for _ in range(4)]
    assert all(array is not None for array in held) and len(arena.rings) == 2
    assert arena.allocate((LARGE,), np.uint8) is None  # the limit: the caller uses private memory
    del held[0]                                        # a ring frees in order: the oldest slot first
    assert arena.allocate((LARGE,), np.uint8) is not None
    assert arena.allocate((0,), np.uint8) is None


def test_sources_writing_into_shared_memory_give_the_inline_result_through_process_hops(tmp_path):
    results = []
    for mode in ("inline", "process"):
        path = tmp_path / f"{mode}.json"
        Pipeline.parse(f"test-src epochs=4 pages=700 batch-pages=100 pattern=counter ! identity ! identity workers=2 "
                       f"! hoarder path={path}").run(mode=mode, max_inflight="1MiB", timeout=60)
        results.append(read_record(path))
    assert results[0]["pages"] == results[1]["pages"] and len(results[0]["pages"]) == 2800


@pytest.mark.parametrize("chain", ["tamper how=meta ! shifter", "tamper how=pages"])
def test_a_batch_changed_in_place_by_a_pass_through_stage_is_sent_as_changed_not_by_its_old_reference(tmp_path, chain):
    results = []
    for mode in ("inline", "process"):
        path = tmp_path / f"{mode}.json"
        Pipeline.parse(f"test-src epochs=2 pages=600 batch-pages=100 pattern=counter ! identity ! {chain} "
                       f"! recorder path={path}").run(mode=mode, timeout=60)
        results.append(read_record(path))
    assert results[0]["pages"] == results[1]["pages"] and results[0]["pages"][0][1] == 1   # shifted by one
