"""classify: ZERO / RAW / NORMAL kinds from page contents, ranges, regions and a predicate."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch import DELTAS, Batch, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.testing import Harness, layout_batch, page_kinds, pages_batch
from stages.classify import Classify, parse_page_ranges
from stages.common.layout import in_ranges
from stages.rle import RunLengthEncode
from stages.xor_delta import XorDelta, XorDeltaRle

PAGE = 4096


def classify(harness: Harness, batch: Batch) -> dict[int, PageKind]:
    return page_kinds(harness.push_one(batch))


def test_zero_pages_are_marked_zero_and_others_normal():
    kinds = classify(Harness(Classify()), pages_batch([1, 2, 3], zero=[2]))
    assert kinds == {1: PageKind.NORMAL, 2: PageKind.ZERO, 3: PageKind.NORMAL}


def test_single_nonzero_byte_at_the_end_is_not_zero():
    batch = pages_batch([1], zero=[1])
    batch.data[0, -1] = 1
    assert classify(Harness(Classify()), batch) == {1: PageKind.NORMAL}


def test_raw_page_ranges_are_inclusive_and_win_over_zero():
    stage = Harness(Classify(raw_pages="2-3, 7"))
    kinds = classify(stage, pages_batch([1, 2, 3, 4, 7, 8], zero=[3, 8]))
    assert kinds == {1: PageKind.NORMAL, 2: PageKind.RAW, 3: PageKind.RAW, 4: PageKind.NORMAL,
                     7: PageKind.RAW, 8: PageKind.ZERO}
    assert stage.stage.counters == {"zero": 1, "raw": 3, "normal": 2}


def test_overlapping_ranges_cover_their_union():
    ranges = parse_page_ranges("10-20,12-13,30")
    pages = np.array([9, 10, 15, 20, 21, 29, 30, 31], dtype=np.uint64)
    assert list(in_ranges(pages, ranges)) == [False, True, True, True, False, False, True, False]


def test_raw_regions_come_from_the_layout():
    stage = Harness(Classify(raw_regions="stack"))
    regions = [("heap", 0x10000, 0, 4), ("stack", 0x90000, 4, 2)]
    (forwarded,) = stage.layout(regions)
    assert forwarded.meta["regions"] == layout_batch(regions).meta["regions"]
    kinds = classify(stage, pages_batch([3, 4, 5, 6]))
    assert kinds == {3: PageKind.NORMAL, 4: PageKind.RAW, 5: PageKind.RAW, 6: PageKind.NORMAL}


def test_raw_region_missing_from_the_layout_is_warned_about():
    stage = Harness(Classify(raw_regions="pagetables"))
    stage.layout([("heap", 0, 0, 4)])
    assert len(stage.warnings) == 1 and "pagetables" in stage.warnings[0]


def test_raw_predicate_selects_pages_from_python():
    stage = Harness(Classify(raw_predicate=lambda pages: pages % 2 == 0))
    kinds = classify(stage, pages_batch([1, 2, 3, 4]))
    assert kinds == {1: PageKind.NORMAL, 2: PageKind.RAW, 3: PageKind.NORMAL, 4: PageKind.RAW}


def test_pages_already_raw_stay_raw():
    batch = pages_batch([1, 2])
    batch.kinds[1] = PageKind.RAW
    assert classify(Harness(Classify()), batch) == {1: PageKind.NORMAL, 2: PageKind.RAW}


def test_predicate_returning_the_wrong_shape_is_a_config_error():
    stage = Harness(Classify(raw_predicate=lambda pages: np.array([True])))
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
    stage = Harness(Classify(raw_regions="heap"))
    with pytest.raises(CorruptData, match="classify: LAYOUT of epoch 1, region 0"):
        stage.layout([{"name": "heap"}])


def test_bad_batches_are_corrupt_naming_the_stage():
    stage = Harness(Classify())
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
    assert page_kinds(Harness(fused).push_one(pages_batch([1, 2, 3], zero=[3]))) == {
        1: PageKind.RAW, 2: PageKind.FULL, 3: PageKind.ZERO}
    classify_member, xor_delta_member, _ = fused.fusion.members  # each element keeps its own counters
    assert classify_member.counters == {"zero": 1, "raw": 1, "normal": 1}
    assert xor_delta_member is fused and fused.counters["misses"] == 1 and "raw" not in fused.counters
    assert Classify().fuse(XorDelta(workers=2)) is None
    assert Classify().fuse(Classify()) is None
