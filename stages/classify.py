"""classify: mark each page ZERO, RAW (bypasses the XOR cache) or NORMAL.

RAW pages are chosen by page-number ranges (``raw-pages="0-15,100-200"``,
inclusive), by region name from the LAYOUT batch (``raw-regions="heap,stack"``)
or, from Python, by a predicate on page numbers (``raw-predicate``). RAW wins
over ZERO: a page the user wants to bypass the cache never enters it. Pages
that arrive already RAW or ZERO keep their kind. Counters: zero, raw, normal.

Followed by xor-delta with as many workers, classify fuses into it: the pages
then cross one process boundary fewer (they are the biggest flow of the chain).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from pipeline.batch import KIND_NORMAL, KIND_RAW, KIND_ZERO, PAGES, Batch, Flag
from pipeline.errors import ConfigError
from pipeline.stage import Property, Stage
from stages.common.checks import check_pages_batch, page_data
from stages.common.layout import in_ranges, layout_regions, page_ranges
from stages.common.pages import find_zero_pages


def parse_page_ranges(text: str) -> np.ndarray:
    """``"0-15,100,200-300"`` -> int64 array of [first, end) rows (end exclusive)."""
    ranges = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ConfigError(f"classify: raw-pages entry {part!r} is not N or N-M") from None
        if low < 0 or high < low:
            raise ConfigError(f"classify: raw-pages entry {part!r} is not an increasing range of page numbers")
        ranges.append((low, high + 1))
    return np.array(ranges, dtype=np.int64).reshape(-1, 2)


class Classify(Stage):
    factory_name = "classify"
    description = "Mark pages ZERO, RAW (bypass the XOR cache, by page range, region or predicate) or NORMAL"
    input_caps = (PAGES,)
    output_caps = PAGES

    raw_pages = Property("str", "", "Pages sent as-is, bypassing the cache: N or N-M (inclusive), comma-separated")
    raw_regions = Property("str", "", "Regions (names from the LAYOUT) whose pages are sent as-is, comma-separated")
    raw_predicate = Property("object", None, "Python API: callable(page_numbers) -> bool mask of pages sent as-is")

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._raw_page_ranges = parse_page_ranges(self.raw_pages)
        self._raw_region_names = {n.strip() for n in self.raw_regions.split(",") if n.strip()}
        if self.raw_predicate is not None and not callable(self.raw_predicate):
            raise ConfigError(f"classify: raw-predicate must be callable, got {type(self.raw_predicate).__name__}")
        self._raw_ranges = self._raw_page_ranges  # plus the raw regions' pages once a LAYOUT names them
        self.counters.update(zero=0, raw=0, normal=0)

    def fuse(self, downstream: Stage) -> Stage | None:
        """The built-in xor-delta classifying in front of its cache, if it runs as many workers: the same work,
        one process hop fewer. Only these exact classes fuse (merging stages never changes results)."""
        from stages.xor_delta import XorDelta, XorDeltaRle  # that module builds on this one

        if type(self) is not Classify or not isinstance(downstream, XorDelta) \
                or type(downstream) not in (XorDelta, XorDeltaRle):
            return None
        if downstream.classify is not None or downstream.workers != self.workers:
            return None
        return type(downstream)(**downstream.property_values(), classify=self.property_values())

    def control(self, batch: Batch) -> Iterable[Batch]:
        if batch.flags & Flag.LAYOUT and self._raw_region_names:
            regions = layout_regions(batch, self.factory_name)
            chosen = [r for r in regions if r.name in self._raw_region_names]
            missing = self._raw_region_names - {r.name for r in chosen}
            if missing:
                self.context.warn(f"classify: raw-regions not in the layout of epoch {batch.epoch}: "
                                  f"{', '.join(sorted(missing))}")
            self._raw_ranges = np.concatenate([self._raw_page_ranges, page_ranges(chosen)])
        yield batch

    def process(self, batch: Batch) -> Iterable[Batch]:
        check_pages_batch(batch, self.factory_name)
        yield batch.with_(kinds=self.classified_kinds(batch))

    @property
    def zero_pages_only(self) -> bool:
        """Whether this classify only tells all-zero pages apart (no RAW pages, ranges, regions or predicate)."""
        return not self._raw_ranges.shape[0] and not self._raw_region_names and self.raw_predicate is None

    def count(self, zero: int, raw: int, pages: int) -> None:
        """Count a batch of ``pages`` pages classified (here or by a fused stage's kernel)."""
        self.counters["zero"] += zero
        self.counters["raw"] += raw
        self.counters["normal"] += pages - zero - raw

    def classified_kinds(self, batch: Batch) -> np.ndarray:
        """The kinds of a checked PAGES batch's pages after classification (a new array); counts them."""
        kinds_in = batch.kinds
        zero = find_zero_pages(page_data(batch, self.factory_name))
        raw = None
        if kinds_in.any():  # pages that arrive ZERO or RAW keep their kind
            zero |= kinds_in == KIND_ZERO
            raw = kinds_in == KIND_RAW
        if self._raw_ranges.shape[0]:
            in_raw_ranges = in_ranges(batch.page_numbers, self._raw_ranges)
            raw = in_raw_ranges if raw is None else raw | in_raw_ranges
        if self.raw_predicate is not None:
            chosen = self._predicate_mask(batch.page_numbers)
            raw = chosen if raw is None else raw | chosen
        kinds = np.where(zero, np.uint8(KIND_ZERO), np.uint8(KIND_NORMAL))
        n_zero, n_raw = int(np.count_nonzero(zero)), 0
        if raw is not None and raw.any():  # RAW wins over ZERO
            kinds[raw] = KIND_RAW
            n_raw = int(np.count_nonzero(raw))
            n_zero = int(np.count_nonzero(kinds == KIND_ZERO))
        self.count(zero=n_zero, raw=n_raw, pages=batch.npages)
        return kinds

    def _predicate_mask(self, page_numbers: np.ndarray) -> np.ndarray:
        predicate: Callable[[np.ndarray], Any] = self.raw_predicate
        mask = np.asarray(predicate(page_numbers.copy()))
        if mask.shape != page_numbers.shape:
            raise ConfigError(f"classify: raw-predicate returned shape {mask.shape} for {page_numbers.shape[0]} pages")
        return mask.astype(bool)
