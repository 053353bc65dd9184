"""xor-delta: the LRU cache of last-sent copies (hits, misses, evictions, RAW, ZERO, RESYNC, layout)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import DELTAS, ENCODED, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.testing import Harness, layout_batch, page_kinds as kinds_by_page, pages_batch as make_pages
from stages.codecs import Encoded, get_codec
from stages.classify import Classify
from stages.entropy import Zstd
from stages.rle import RunLengthEncode
from stages.xor_delta import DENSE_PAGE_LIMIT, XorDelta, XorDeltaRle

PAGE = 4096


def page_of(value: int) -> np.ndarray:
    """A recognisable page: every byte ``value`` except a marker at the start."""
    page = np.full(PAGE, value % 256, dtype=np.uint8)
    page[:8] = np.frombuffer(np.uint64(value).tobytes(), dtype=np.uint8)
    return page


def pages_batch(numbers, versions=None, **fields) -> Batch:
    """Pages ``numbers`` holding ``page_of`` their versions (default: their numbers)."""
    versions = numbers if versions is None else versions
    return make_pages(numbers, np.array([page_of(int(v)) for v in versions], np.uint8), **fields)


def test_first_sight_is_a_miss_then_a_hit_with_the_previous_copy_as_reference():
    stage = Harness(XorDelta())
    first = stage.push_one(pages_batch([5, 6], versions=[1, 2]))
    assert first.format == DELTAS
    assert list(first.kinds) == [PageKind.FULL, PageKind.FULL]
    second = stage.push_one(pages_batch([5, 6], versions=[3, 4], epoch=2))
    assert list(second.kinds) == [PageKind.DELTA, PageKind.DELTA]
    np.testing.assert_array_equal(second.reference[0], page_of(1))
    np.testing.assert_array_equal(second.reference[1], page_of(2))
    np.testing.assert_array_equal(second.data[0], page_of(3))
    assert stage.stage.counters["hits"] == 2 and stage.stage.counters["misses"] == 2
    assert stage.stage.counters["bytes_in"] == 4 * PAGE


def test_small_cache_evicts_least_recently_used():
    stage = Harness(XorDelta(cache_pages=2))
    stage.push_one(pages_batch([1, 2]))              # misses: 1, 2
    stage.push_one(pages_batch([1], epoch=2))         # hit 1; 2 is now least recently used
    out = stage.push_one(pages_batch([3], epoch=3))   # miss 3 evicts 2
    assert list(out.kinds) == [PageKind.FULL]
    out = stage.push_one(pages_batch([1, 2], epoch=4))  # 1 still cached, 2 was evicted (evicts 3)
    assert kinds_by_page(out) == {1: PageKind.DELTA, 2: PageKind.FULL}
    assert stage.stage.counters == {**stage.stage.counters, "hits": 2, "misses": 4, "evictions": 2}
    assert stage.stage.cached_pages == 2


def test_cache_size_in_bytes_is_split_among_workers():
    stage = Harness(XorDelta(cache="64KiB"), worker_index=1, worker_count=2)
    assert stage.stage.cache_slots(PAGE) == 8
    assert XorDelta(cache_pages=10).cache_slots(PAGE) == 10


def test_batch_larger_than_cache_sends_the_overflow_whole_and_uncached():
    stage = Harness(XorDelta(cache_pages=2))
    out = stage.push_one(pages_batch([1, 2, 3, 4]))
    assert list(out.kinds) == [PageKind.FULL] * 4
    assert stage.stage.cached_pages == 2
    again = stage.push_one(pages_batch([1, 2, 3, 4], versions=[5, 6, 7, 8], epoch=2))
    hits = [p for p, k in kinds_by_page(again).items() if k == PageKind.DELTA]
    assert len(hits) == 2
    for row in np.flatnonzero(again.kinds == PageKind.DELTA):
        np.testing.assert_array_equal(again.reference[row], page_of(int(again.page_numbers[row])))


def test_raw_page_drops_its_cache_entry():
    stage = Harness(XorDelta())
    stage.push_one(pages_batch([7]))
    out = stage.push_one(pages_batch([7], kinds=[PageKind.RAW], epoch=2))
    assert list(out.kinds) == [PageKind.RAW]
    assert stage.stage.cached_pages == 0
    out = stage.push_one(pages_batch([7], epoch=3))
    assert list(out.kinds) == [PageKind.FULL]


def test_zero_page_makes_the_cached_copy_zeros():
    stage = Harness(XorDelta())
    stage.push_one(pages_batch([9]))
    zero = pages_batch([9], kinds=[PageKind.ZERO], epoch=2)
    zero.data[:] = 0
    assert list(stage.push_one(zero).kinds) == [PageKind.ZERO]
    out = stage.push_one(pages_batch([9], versions=[42], epoch=3))
    assert list(out.kinds) == [PageKind.DELTA]
    assert not out.reference[0].any()


def test_resync_flag_clears_the_cache_once_per_epoch():
    stage = Harness(XorDelta())
    stage.push_one(pages_batch([1, 2]))
    out = stage.push_one(pages_batch([1], epoch=2, flags=Flag.RESYNC))
    assert list(out.kinds) == [PageKind.FULL]
    out = stage.push_one(pages_batch([2], epoch=2, flags=Flag.RESYNC))  # same epoch: page 1 stays cached
    assert list(out.kinds) == [PageKind.FULL]
    assert stage.stage.cached_pages == 2
    stage.push(Batch.control(Flag.EPOCH_END | Flag.RESYNC, epoch=2))
    assert stage.stage.cached_pages == 2
    stage.push(Batch.control(Flag.EPOCH_END | Flag.RESYNC, epoch=3))
    assert stage.stage.cached_pages == 0


def test_resync_after_a_restarted_sender_reuses_an_epoch_number():
    stage = Harness(XorDelta())
    stage.push_one(pages_batch([1], epoch=1, flags=Flag.RESYNC))
    stage.push_one(pages_batch([1], epoch=2))
    out = stage.push_one(pages_batch([1], epoch=1, flags=Flag.RESYNC))  # the sender started over at epoch 1
    assert list(out.kinds) == [PageKind.FULL]


def layout(*regions) -> Batch:
    return layout_batch((name, 0x1000 * first, first, npages) for name, first, npages in regions)


def test_layout_that_drops_a_region_drops_its_pages():
    stage = Harness(XorDelta())
    stage.push(layout(("heap", 0, 4), ("stack", 4, 4)))
    stage.push_one(pages_batch([1, 2, 5, 6]))
    stage.push(layout(("heap", 0, 4)))
    out = stage.push_one(pages_batch([1, 5], epoch=2))
    assert kinds_by_page(out) == {1: PageKind.DELTA, 5: PageKind.FULL}


def test_layout_vanished_ranges_drop_their_pages():
    stage = Harness(XorDelta())
    stage.push(layout(("heap", 0, 8)))
    stage.push_one(pages_batch([1, 2, 3]))
    shrunk = layout(("heap", 0, 8))
    shrunk.meta["vanished"] = [{"first_page": 2, "npages": 1}]
    stage.push(shrunk)
    out = stage.push_one(pages_batch([1, 2, 3], epoch=2))
    assert kinds_by_page(out) == {1: PageKind.DELTA, 2: PageKind.FULL, 3: PageKind.DELTA}


def test_sparse_page_numbers_use_the_fallback_map():
    stage = Harness(XorDelta())
    far = DENSE_PAGE_LIMIT + 12345
    stage.push_one(pages_batch([3, far]))
    out = stage.push_one(pages_batch([3, far, far + 1], epoch=2))
    assert kinds_by_page(out) == {3: PageKind.DELTA, far: PageKind.DELTA, far + 1: PageKind.FULL}


def test_repeated_page_number_in_a_batch_is_corrupt():
    with pytest.raises(CorruptData, match="xor-delta.*repeats"):
        Harness(XorDelta()).push(pages_batch([4, 4]))


def test_repeated_cached_page_number_is_corrupt_in_the_fused_stage_too():
    stage = Harness(Classify().fuse(XorDelta().fuse(RunLengthEncode())))
    stage.push_one(pages_batch([4, 5]))
    with pytest.raises(CorruptData, match="xor-delta.*repeats"):
        stage.push_one(pages_batch([5, 4, 4], epoch=2))


def test_page_size_change_is_corrupt():
    stage = Harness(XorDelta())
    stage.push_one(pages_batch([1]))
    small = Batch(page_size=1024, page_numbers=np.array([2], np.uint64), kinds=np.zeros(1, np.uint8),
                  data=np.zeros((1, 1024), np.uint8))
    with pytest.raises(CorruptData, match="xor-delta.*page size 1024"):
        stage.push_one(small)


def test_fused_format_without_the_page_size_is_a_config_error():
    fused = Harness(XorDelta().fuse(RunLengthEncode(format="xen")))
    small = Batch(page_size=1024, page_numbers=np.array([2], np.uint64), kinds=np.zeros(1, np.uint8),
                  data=np.ones((1, 1024), np.uint8))
    with pytest.raises(ConfigError, match="rle: xen: the format defines only page size 4096"):
        fused.push_one(small)


def test_wrong_format_or_kind_is_corrupt_naming_the_stage():
    stage = Harness(XorDelta())
    with pytest.raises(CorruptData, match="xor-delta: expected a pages batch"):
        stage.push_one(pages_batch([1]).with_(format=DELTAS))
    with pytest.raises(CorruptData, match="xor-delta.*page kind 4"):
        stage.push_one(pages_batch([1], kinds=[PageKind.DELTA]))
    with pytest.raises(CorruptData, match="xor-delta.*data shape"):
        stage.push_one(pages_batch([1, 2]).with_(data=np.zeros((1, PAGE), np.uint8)))


def test_fuses_with_rle_only():
    fused = XorDelta(cache_pages=3).fuse(RunLengthEncode(format="xbzrle"))
    assert isinstance(fused, XorDeltaRle)
    assert fused.format == "xbzrle" and fused.cache_pages == 3 and fused.output_caps == ENCODED
    assert XorDelta().fuse(Zstd()) is None
    assert fused.fuse(RunLengthEncode()) is None


# ---- invariant 2 under any sequence of batches -----------------------------------------------------------------

@st.composite
def batch_sequences(draw):
    """Batches over pages 0..11: random subsets, kinds and sparse writes; a RESYNC now and then."""
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        pages = draw(st.lists(st.integers(0, 11), min_size=0, max_size=8, unique=True))
        kinds = [draw(st.sampled_from([PageKind.NORMAL] * 4 + [PageKind.ZERO, PageKind.RAW])) for _ in pages]
        writes = [draw(st.lists(st.tuples(st.integers(0, PAGE - 1), st.integers(1, 255)), max_size=3)) for _ in pages]
        steps.append((pages, kinds, writes, draw(st.booleans()) and draw(st.booleans())))
    return steps


@settings(max_examples=60, deadline=None)
@given(steps=batch_sequences(), cache_pages=st.integers(1, 6))
def test_receiver_copy_always_equals_the_cached_copy(steps, cache_pages):
    stage = Harness(XorDelta(cache_pages=cache_pages).fuse(RunLengthEncode()))
    codec = get_codec("native")
    memory = np.zeros((12, PAGE), np.uint8)
    replica = np.full((12, PAGE), 0x55, np.uint8)
    for epoch, (pages, kinds, writes, resync) in enumerate(steps, start=1):
        for page, kind, page_writes in zip(pages, kinds, writes):
            if kind == PageKind.ZERO:
                memory[page] = 0
            else:
                for offset, value in page_writes:
                    memory[page, offset] = value
        batch = Batch(epoch=epoch, flags=Flag.RESYNC if resync else Flag.NONE,
                      page_numbers=np.array(pages, np.uint64), kinds=np.array(kinds, np.uint8),
                      data=memory[pages] if pages else np.empty((0, PAGE), np.uint8))
        out = stage.push_one(batch)
        codec.decode(Encoded(out.payload, out.offsets, out.kinds, "native", int(out.offsets[-1])), replica,
                     rows=out.page_numbers.astype(np.int64))
        np.testing.assert_array_equal(replica[pages], memory[pages])
        cache = stage.stage._cache
        cached = np.flatnonzero(cache.page_of_slot >= 0)
        assert len(cached) <= cache_pages
        # Invariant 2: every cached copy is exactly what the receiver holds for that page.
        np.testing.assert_array_equal(cache.pages[cached], replica[cache.page_of_slot[cached]])
        np.testing.assert_array_equal(cache.lookup(cache.page_of_slot[cached].astype(np.uint64)), cached)


@settings(max_examples=40, deadline=None)
@given(steps=batch_sequences(), cache_pages=st.integers(1, 6), raw_pages=st.sampled_from(["", "3-4"]))
def test_fused_classify_xor_delta_rle_encodes_as_the_three_stages_apart(steps, cache_pages, raw_pages):
    """The fused stage classifies and looks pages up in one kernel (or in numpy when RAW pages come): either
    way its batches equal those of classify ! xor-delta ! rle run one after another."""
    fused = Harness(Classify(raw_pages=raw_pages).fuse(XorDelta(cache_pages=cache_pages).fuse(RunLengthEncode())))
    apart = Harness(Classify(raw_pages=raw_pages), XorDelta(cache_pages=cache_pages), RunLengthEncode())
    memory = np.zeros((12, PAGE), np.uint8)
    for epoch, (pages, kinds, writes, resync) in enumerate(steps, start=1):
        for page, kind, page_writes in zip(pages, kinds, writes):
            memory[page] = 0 if kind == PageKind.ZERO else memory[page]
            for offset, value in page_writes if kind != PageKind.ZERO else ():
                memory[page, offset] = value
        batch = Batch(epoch=epoch, flags=Flag.RESYNC if resync else Flag.NONE,
                      page_numbers=np.array(pages, np.uint64), kinds=np.array(kinds, np.uint8),
                      data=memory[pages] if pages else np.empty((0, PAGE), np.uint8))
        expected = apart.push_one(batch)
        out = fused.push_one(batch)
        assert out.page_numbers.tolist() == expected.page_numbers.tolist()
        assert out.kinds.tolist() == expected.kinds.tolist()
        assert out.offsets.tolist() == expected.offsets.tolist()
        assert bytes(out.payload) == bytes(expected.payload)
    assert [member.counters for member in fused.stage.fusion.members] == [stage.counters for stage in apart.stages]
