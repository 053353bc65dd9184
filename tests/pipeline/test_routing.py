"""Fan-out (page sharding, round-robin, broadcast) and fan-in (barriers, page-count sums)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch import DELTAS, ENCODED, PAGES, Batch, Flag
from pipeline.errors import CorruptData
from pipeline.pipeline import Pipeline
from pipeline.routing import EpochPageCounter, FanIn, Router, merge_markers, split_by_page


def pages_batch(numbers, fmt=PAGES, epoch=0, page_size=16) -> Batch:
    numbers = np.asarray(numbers, dtype=np.uint64)
    data = (numbers[:, None] + np.arange(page_size)).astype(np.uint8)
    batch = Batch(format=fmt, epoch=epoch, page_size=page_size, page_numbers=numbers,
                  kinds=(numbers % 3).astype(np.uint8), data=data)
    if fmt == DELTAS:
        batch.reference = data[::-1].copy()
    return batch


def epoch_end(epoch: int, pages: int | None = None, **meta) -> Batch:
    if pages is not None:
        meta["pages"] = pages
    return Batch.control(Flag.EPOCH_END, epoch, **meta)


@pytest.mark.parametrize("fmt", [PAGES, DELTAS])
def test_split_by_page_gives_each_worker_its_pages_with_every_array_consistent(fmt):
    batch = pages_batch([5, 2, 9, 4, 7, 12, 3], fmt=fmt)
    parts = split_by_page(batch, 3)
    seen = []
    for worker, part in enumerate(parts):
        assert part is not None
        assert np.all(part.page_numbers % 3 == worker)
        rows = [list(batch.page_numbers).index(p) for p in part.page_numbers]
        assert np.array_equal(part.kinds, batch.kinds[rows])
        assert np.array_equal(part.data, batch.data[rows])
        if fmt == DELTAS:
            assert np.array_equal(part.reference, batch.reference[rows])
        assert part.data.flags.c_contiguous
        part.validate()
        seen.extend(part.page_numbers.tolist())
    assert sorted(seen) == sorted(batch.page_numbers.tolist())


def test_split_by_page_leaves_workers_without_pages_empty_and_keeps_whole_batches():
    batch = pages_batch([4, 8])
    parts = split_by_page(batch, 4)
    assert parts[0] is batch and parts[1:] == [None, None, None]


def test_split_by_page_refuses_encoded_batches():
    batch = Batch(format=ENCODED, page_numbers=np.array([1, 2], np.uint64), kinds=np.zeros(2, np.uint8),
                  payload=np.zeros(4, np.uint8), offsets=np.array([0, 2, 4], np.uint64))
    with pytest.raises(CorruptData, match="cannot split"):
        split_by_page(batch, 2)


def test_router_broadcasts_control_batches_and_round_robins_whole_batches():
    router = Router(3, None)
    marker = epoch_end(0)
    assert [w for w, _ in router.route(marker)] == [0, 1, 2]
    targets = [next(iter(router.route(pages_batch([1]))))[0] for _ in range(4)]
    assert targets == [0, 1, 2, 0]


def test_fan_in_holds_an_input_after_its_marker_until_every_input_delivered_it():
    fan_in = FanIn(2)
    assert fan_in.push(0, pages_batch([1])) and not fan_in.blocked(0)
    assert fan_in.push(0, epoch_end(0, 1)) == []
    assert fan_in.blocked(0) and not fan_in.blocked(1)
    assert fan_in.push(0, pages_batch([3], epoch=1)) == []  # held: epoch 1 must wait
    released = fan_in.push(1, pages_batch([2]))
    assert [b.npages for b in released] == [1]
    released = fan_in.push(1, epoch_end(0, 1))
    assert [bool(b.is_control) for b in released] == [True, False]
    assert released[0].meta["pages"] == 2 and released[1].epoch == 1
    assert not fan_in.blocked(0) and not fan_in.blocked(1)


def test_merged_epoch_end_sums_pages_and_keeps_other_meta_of_the_first_arrival():
    merged = merge_markers([epoch_end(4, 3, digest="abc", pause_ms=1.5), epoch_end(4, 5, digest="zzz")])
    assert merged.meta == {"pages": 8, "digest": "abc", "pause_ms": 1.5}


def test_merging_different_markers_is_an_error():
    with pytest.raises(CorruptData, match="different control markers"):
        merge_markers([epoch_end(1, 0), epoch_end(2, 0)])


def test_markers_of_different_streams_are_not_merged():
    """Lanes of one stream (receiving workers) all name its identity: another stream's marker is an error."""
    merged = merge_markers([epoch_end(3, 2, stream_id="aa" * 16), epoch_end(3, 1, stream_id="aa" * 16)])
    assert merged.meta == {"pages": 3, "stream_id": "aa" * 16}
    with pytest.raises(CorruptData, match=f"EPOCH_END markers of epoch 3 from different streams \\({'aa' * 16}, "
                                          f"{'bb' * 16}\\)"):
        merge_markers([epoch_end(3, 2, stream_id="aa" * 16), epoch_end(3, 1, stream_id="bb" * 16)])


def test_page_counter_stamps_each_epoch_end_with_the_pages_emitted_in_that_epoch():
    counter = EpochPageCounter()
    counter.stamp(pages_batch([1, 2, 3], epoch=0))
    counter.stamp(pages_batch([4], epoch=0))
    original = epoch_end(0, 99, digest="d")
    stamped = counter.stamp(original)
    assert stamped.meta == {"pages": 4, "digest": "d"}
    assert original.meta["pages"] == 99  # the incoming marker is not modified
    assert counter.stamp(epoch_end(1)).meta["pages"] == 0


def test_the_plan_tells_a_node_how_its_next_stage_shards_pages():
    plan = Pipeline.parse("test-src ! xor-delta workers=3 ! rle ! zstd workers=2 ! frame ! null-sink").plan()
    assert [plan.output_shards(index) for index in range(len(plan.nodes))] == [3, 1, 1, 1, 1]  # xor-delta+rle fused
