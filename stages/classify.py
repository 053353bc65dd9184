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

from pipeline.batch import KIND_NORMAL, KIND_RAW, KIND_ZERO, PAGES, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.stage import Property, Stage
from stages.common.pages import check_page_size, find_zero_pages
from stages.common.layout import Region


def layout_regions(batch: Batch, where: str) -> list[Region]:
    """The regions of a LAYOUT batch's ``meta["regions"]``, checked; CorruptData naming ``where`` if malformed."""
    entries = batch.meta.get("regions")
    if not isinstance(entries, list):
        raise CorruptData(f"{where}: LAYOUT of epoch {batch.epoch} has no regions list")
    regions = []
    for index, entry in enumerate(entries):
        try:
            region = Region(str(entry["name"]), int(entry["start"]), int(entry["first_page"]), int(entry["npages"]))
        except (KeyError, TypeError, ValueError):
            raise CorruptData(f"{where}: LAYOUT of epoch {batch.epoch}, region {index} is malformed: "
                              f"{entry!r}") from None
        if region.first_page < 0 or region.npages < 0:
            raise CorruptData(f"{where}: LAYOUT of epoch {batch.epoch}, region {region.name!r} has negative pages")
        regions.append(region)
    return regions


def page_ranges(regions: Iterable[Region]) -> np.ndarray:
    """The [first, end) page-number rows of ``regions``, as ``in_ranges`` takes them."""
    rows = [(r.first_page, r.first_page + r.npages) for r in regions]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


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


def in_ranges(page_numbers: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Bool mask: which page numbers fall in any [first, end) row of ``ranges`` (vectorised)."""
    if ranges.shape[0] == 0:
        return np.zeros(page_numbers.shape[0], dtype=bool)
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    pages = page_numbers.astype(np.int64)
    # For each page, the last range starting at or before it; inside if below that range's end.
    candidate = np.searchsorted(ranges[:, 0], pages, side="right") - 1
    # Overlapping ranges: compare with the furthest end reached so far.
    reach = np.maximum.accumulate(ranges[:, 1])
    return (candidate >= 0) & (pages < reach[np.maximum(candidate, 0)])


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

        if (type(self) is not Classify or type(downstream) not in (XorDelta, XorDeltaRle)
                or not isinstance(downstream, XorDelta) or downstream.classify is not None or downstream.workers != self.workers):
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
        assert batch.data is not None  # checked: check_pages_batch
        zero = find_zero_pages(batch.data)
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


def check_pages_batch(batch: Batch, where: str) -> None:
    """Raise CorruptData naming ``where`` unless ``batch`` is a consistent PAGES batch with known kinds."""
    if batch.format != PAGES:
        raise CorruptData(f"{where}: expected a {PAGES} batch, got {batch.format!r} (epoch {batch.epoch})")
    if batch.data is None:
        raise CorruptData(f"{where}: {PAGES} batch of epoch {batch.epoch} carries no page data")
    try:
        batch.validate()
    except CorruptData as exc:
        raise CorruptData(f"{where}: {exc}") from None
    if batch.data.dtype != np.uint8 or batch.page_numbers.dtype != np.uint64 or batch.kinds.dtype != np.uint8:
        raise CorruptData(f"{where}: batch of epoch {batch.epoch} has wrong dtypes")
    if not batch.data.flags.c_contiguous:
        raise CorruptData(f"{where}: page data of epoch {batch.epoch} is not C-contiguous (np.ascontiguousarray)")
    try:
        check_page_size(batch.page_size)
    except ValueError as exc:
        raise CorruptData(f"{where}: batch of epoch {batch.epoch}: {exc}") from None
    if batch.npages and int(batch.kinds.max()) > KIND_RAW:  # NORMAL, ZERO and RAW are 0, 1 and 2
        bad = first_bad_kind(batch.kinds, (PageKind.NORMAL, PageKind.ZERO, PageKind.RAW))
        raise CorruptData(f"{where}: {PAGES} batch of epoch {batch.epoch} has page kind {bad}, "
                          "expected NORMAL/ZERO/RAW")


def first_bad_kind(kinds: np.ndarray, allowed: Iterable[PageKind]) -> int | None:
    """The first value of ``kinds`` not in ``allowed``, or None (one table lookup per page)."""
    table = np.zeros(256, dtype=bool)
    table[list(allowed)] = True
    valid = table[kinds]
    return None if valid.all() else int(kinds[np.argmin(valid)])
