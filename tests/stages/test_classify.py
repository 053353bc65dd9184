"""classify: ZERO / RAW / NORMAL kinds from page contents, ranges, regions and a predicate."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch import DELTAS, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.stage import StageContext
from stages.classify import Classify, in_ranges, parse_page_ranges
from stages.rle import RunLengthEncode
from stages.xor_delta import XorDelta, XorDeltaRle

PAGE = 4096


def pages_batch(numbers, zero=()) -> Batch:
    """Pages numbered ``numbers``, all non-zero except those listed in ``zero``."""
    numbers = np.asarray(numbers, dtype=np.uint64)
    data = np.ones((len(numbers), PAGE), dtype=np.uint8)
    for page in zero:
        data[list(numbers).index(page)] = 0
    return Batch(page_numbers=numbers, kinds=np.zeros(len(numbers), np.uint8), data=data)


def classify(stage: Classify, batch: Batch) -> dict[int, PageKind]:
    (out,) = list(stage.handle(batch))
    return {int(p): PageKind(int(k)) for p, k in zip(out.page_numbers, out.kinds)}


def started(stage: Classify, messages: list | None = None) -> Classify:
    """``stage`` started; bus messages it posts are appended to ``messages`` as (kind, fields)."""
    sink = messages if messages is not None else []
    stage.start(StageContext("classify", post=lambda kind, **fields: sink.append((kind, fields))))
    return stage


def test_zero_pages_are_marked_zero_and_others_normal():
    kinds = classify(started(Classify()), pages_batch([1, 2, 3], zero=[2]))
    assert kinds == {1: PageKind.NORMAL, 2: PageKind.ZERO, 3: PageKind.NORMAL}


def test_single_nonzero_byte_at_the_end_is_not_zero():
    batch = pages_batch([1], zero=[1])
    batch.data[0, -1] = 1
    assert classify(started(Classify()), batch) == {1: PageKind.NORMAL}


def test_raw_page_ranges_are_inclusive_and_win_over_zero():
    stage = started(Classify(raw_pages="2-3, 7"))
    kinds = classify(stage, pages_batch([1, 2, 3, 4, 7, 8], zero=[3, 8]))
    assert kinds == {1: PageKind.NORMAL, 2: PageKind.RAW, 3: PageKind.RAW, 4: PageKind.NORMAL,
                     7: PageKind.RAW, 8: PageKind.ZERO}
    assert stage.counters == {"zero": 1, "raw": 3, "normal": 2}


def test_overlapping_ranges_cover_their_union():
    ranges = parse_page_ranges("10-20,12-13,30")
    pages = np.array([9, 10, 15, 20, 21, 29, 30, 31], dtype=np.uint64)
    assert list(in_ranges(pages, ranges)) == [False, True, True, True, False, False, True, False]


def test_raw_regions_come_from_the_layout():
    stage = started(Classify(raw_regions="stack"))
    regions = [{"name": "heap", "start": 0x10000, "first_page": 0, "npages": 4},
               {"name": "stack", "start": 0x90000, "first_page": 4, "npages": 2}]
    (forwarded,) = list(stage.handle(Batch.control(Flag.LAYOUT, epoch=1, regions=regions)))
    assert forwarded.meta["regions"] == regions
    kinds = classify(stage, pages_batch([3, 4, 5, 6]))
    assert kinds == {3: PageKind.NORMAL, 4: PageKind.RAW, 5: PageKind.RAW, 6: PageKind.NORMAL}


def test_raw_region_missing_from_the_layout_is_warned_about():
    messages: list = []
    stage = started(Classify(raw_regions="pagetables"), messages)
    list(stage.handle(Batch.control(Flag.LAYOUT, epoch=1, regions=[
        {"name": "heap", "start": 0, "first_page": 0, "npages": 4}])))
    assert messages and messages[0][0] == "warning" and "pagetables" in messages[0][1]["message"]


def test_raw_predicate_selects_pages_from_python():
    stage = started(Classify(raw_predicate=lambda pages: pages % 2 == 0))
    kinds = classify(stage, pages_batch([1, 2, 3, 4]))
    assert kinds == {1: PageKind.NORMAL, 2: PageKind.RAW, 3: PageKind.NORMAL, 4: PageKind.RAW}


def test_pages_already_raw_stay_raw():
    batch = pages_batch([1, 2])
    batch.kinds[1] = PageKind.RAW
    assert classify(started(Classify()), batch) == {1: PageKind.NORMAL, 2: PageKind.RAW}


def test_predicate_returning_the_wrong_shape_is_a_config_error():
    stage = started(Classify(raw_predicate=lambda pages: np.array([True])))
    with pytest.raises(ConfigError, match="raw-predicate returned shape"):
        classify(stage, pages_batch([1, 2]))


@pytest.mark.parametrize("text", ["5-2", "a-b", "-3", "1-2-3"])
def test_malformed_raw_pages_is_a_config_error(text):
    with pytest.raises(ConfigError, match="classify: raw-pages"):
        Classify(raw_pages=text)


def test_non_callable_predicate_is_a_config_error():
    with pytest.raises(ConfigError, match="raw-predicate must be callable"):
        Classify(raw_predicate=3)


def test_malformed_layout_is_corrupt():
    stage = started(Classify(raw_regions="heap"))
    with pytest.raises(CorruptData, match="classify: LAYOUT of epoch 1, region 0"):
        list(stage.handle(Batch.control(Flag.LAYOUT, epoch=1, regions=[{"name": "heap"}])))


def test_bad_batches_are_corrupt_naming_the_stage():
    stage = started(Classify())
    with pytest.raises(CorruptData, match="classify: expected a pages batch"):
        classify(stage, pages_batch([1]).with_(format=DELTAS))
    with pytest.raises(CorruptData, match="classify: .*no page data"):
        classify(stage, pages_batch([1]).with_(data=None))
    with pytest.raises(CorruptData, match="classify: .*1 kinds for 2 pages"):
        classify(stage, pages_batch([1, 2]).with_(kinds=np.zeros(1, np.uint8)))
    with pytest.raises(CorruptData, match="classify: .*page kind 9"):
        classify(stage, pages_batch([1]).with_(kinds=np.array([9], np.uint8)))
    with pytest.raises(CorruptData, match="classify: .*not C-contiguous"):
        classify(stage, pages_batch([1, 2]).with_(data=np.zeros((2, 2 * PAGE), np.uint8)[:, ::2]))
    odd = Batch(page_size=100, page_numbers=np.zeros(1, np.uint64), kinds=np.zeros(1, np.uint8),
                data=np.zeros((1, 100), np.uint8))
    with pytest.raises(CorruptData, match="classify: .*page size 100"):
        classify(stage, odd)


def test_fuses_into_xor_delta_with_as_many_workers():
    fused = Classify(raw_pages="1").fuse(XorDelta(cache_pages=4)).fuse(RunLengthEncode())
    assert isinstance(fused, XorDeltaRle) and fused.classify == {"raw_pages": "1"} and fused.cache_pages == 4
    fused.start(StageContext(fused.factory_name))
    (out,) = list(fused.handle(pages_batch([1, 2, 3], zero=[3])))
    assert dict(zip(out.page_numbers.tolist(), out.kinds.tolist())) == {1: PageKind.RAW, 2: PageKind.FULL,
                                                                         3: PageKind.ZERO}
    classify_member, xor_delta_member, _ = fused.fusion.members  # each element keeps its own counters
    assert classify_member.counters == {"zero": 1, "raw": 1, "normal": 1}
    assert xor_delta_member is fused and fused.counters["misses"] == 1 and "raw" not in fused.counters
    assert Classify().fuse(XorDelta(workers=2)) is None
    assert Classify().fuse(Classify()) is None
