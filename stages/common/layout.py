"""Layouts: tracked memory regions mapped onto dense page numbers (the one Layout/Region type).

A region covers the addresses [start, start + npages * page_size) and owns the
page numbers [first_page, first_page + npages). A ``Layout`` is a page size and
its regions, which never share page numbers (``check_regions``, the one overlap
check; every reader of an untrusted layout goes through ``regions_from_meta``).
On batches a layout travels as LAYOUT meta: ``regions`` as dicts
(``Region.to_meta``) and ``vanished`` page ranges.

When a process's mappings change, ``remap`` keeps the page numbers of every
surviving address stable, gives addresses that appeared fresh numbers, and
lists the numbers that vanished so the receiver can drop them.

A region made from a numpy array also names the array's ``dtype`` (numpy's
``dtype.str``, such as ``<f8``) and ``shape``, so a replica can give the same
array back (``array_spec`` checks such a pair wherever it comes from).

Errors here are ValueErrors saying what is wrong; each caller raises its own
documented error (CorruptData, ReplicaError) with that text and where.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.batch import Batch
from pipeline.errors import CorruptData

MIN_PAGE_SIZE, MAX_PAGE_SIZE = 512, 65536
MAX_DIMENSIONS = 32


@dataclass(frozen=True)
class Region:
    """One tracked region of a layout (a buffer, or a piece of a process mapping)."""

    name: str
    start: int
    first_page: int
    npages: int
    dtype: str = ""
    """numpy dtype string of the array the region holds ("" for plain bytes)."""
    shape: tuple[int, ...] = ()

    @property
    def end_page(self) -> int:
        """One past the region's last page number."""
        return self.first_page + self.npages

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "start": self.start, "first_page": self.first_page,
                                "npages": self.npages}
        if self.dtype:
            meta.update(dtype=self.dtype, shape=list(self.shape))
        return meta

    @classmethod
    def from_meta(cls, entry: Any, index: int = 0, page_size: int | None = None) -> "Region":
        """A region from its (untrusted) meta dict; ValueError if a field is missing or not a number, or its
        array's dtype and shape (when it names them) are not an array that fits its pages (of ``page_size``)."""
        try:
            region = cls(str(entry["name"]), int(entry["start"]), int(entry["first_page"]), int(entry["npages"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"region {index} is malformed ({exc!r}): {entry!r}") from None
        if not entry.get("dtype"):   # plain bytes
            return region
        capacity = None if page_size is None else region.npages * page_size
        try:
            dtype, shape = array_spec(entry["dtype"], entry.get("shape"), capacity)
        except ValueError as exc:
            raise ValueError(f"region {index} ({region.name}): {exc}") from None
        return replace(region, dtype=dtype, shape=shape)


def array_spec(dtype: Any, shape: Any, capacity: int | None = None) -> tuple[str, tuple[int, ...]]:
    """A checked (dtype string, shape) pair of an array, from untrusted input; ValueError saying what is wrong.

    The dtype must be a plain numpy dtype (no Python objects), the shape a list of
    non-negative ints, and the array no bigger than ``capacity`` bytes when given.
    """
    if not isinstance(dtype, str) or len(dtype) > 64:
        raise ValueError(f"dtype {dtype!r} is not a numpy dtype string")
    try:
        parsed = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):
        raise ValueError(f"dtype {dtype!r} is not a numpy dtype") from None
    if parsed.hasobject or parsed.itemsize == 0:
        raise ValueError(f"dtype {dtype!r} holds Python objects or has no size")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMENSIONS \
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"shape {shape!r} is not a list of at most {MAX_DIMENSIONS} non-negative ints")
    nbytes = parsed.itemsize
    for n in shape:
        nbytes *= n
    if capacity is not None and nbytes > capacity:
        raise ValueError(f"an array {dtype} {list(shape)} of {nbytes} bytes does not fit in {capacity} bytes")
    return parsed.str, tuple(shape)


def check_regions(regions: Iterable[Region]) -> list[Region]:
    """``regions`` sorted by first page; ValueError if one has a negative page range or two share page numbers."""
    ordered = sorted(regions, key=lambda region: region.first_page)
    for region in ordered:
        if region.first_page < 0 or region.npages < 0:
            raise ValueError(f"region {region.name!r} has a negative page range")
    for before, after in zip(ordered, ordered[1:]):
        if before.end_page > after.first_page:
            raise ValueError(f"regions {before.name!r} and {after.name!r} overlap")
    return ordered


def regions_from_meta(entries: Any, page_size: int | None = None) -> list[Region]:
    """The regions of an untrusted LAYOUT ``meta["regions"]`` (or manifest), checked, sorted by first page."""
    if not isinstance(entries, list):
        raise ValueError(f"regions must be a list, got {type(entries).__name__}")
    return check_regions(Region.from_meta(entry, index, page_size) for index, entry in enumerate(entries))


def layout_regions(batch: Batch, where: str) -> list[Region]:
    """The regions of a LAYOUT batch, checked; CorruptData naming ``where`` and the epoch if malformed."""
    try:
        return regions_from_meta(batch.meta.get("regions"))
    except ValueError as exc:
        raise CorruptData(f"{where}: LAYOUT of epoch {batch.epoch}, {exc}") from None


def vanished_ranges(batch: Batch, where: str) -> np.ndarray:
    """[first, end) rows of a LAYOUT's ``meta["vanished"]`` page ranges (page numbers that no longer exist)."""
    rows = []
    for entry in batch.meta.get("vanished") or []:
        try:
            first, npages = int(entry["first_page"]), int(entry["npages"])
        except (KeyError, TypeError, ValueError):
            raise CorruptData(f"{where}: LAYOUT of epoch {batch.epoch} has a malformed vanished range "
                              f"{entry!r}") from None
        rows.append((first, first + npages))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def page_ranges(regions: Iterable[Region]) -> np.ndarray:
    """The [first, end) page-number rows of ``regions``, as ``in_ranges`` takes them."""
    rows = [(r.first_page, r.end_page) for r in regions]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


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


@dataclass(frozen=True)
class Layout:
    """A page size and the tracked regions, mapped onto page-number ranges that never overlap."""

    page_size: int
    regions: tuple[Region, ...]

    @classmethod
    def from_untrusted(cls, page_size: Any, regions: Any, *, max_pages: int) -> "Layout":
        """A layout from the wire or a manifest; ValueError saying what is wrong."""
        if not isinstance(page_size, int) or page_size < MIN_PAGE_SIZE or page_size > MAX_PAGE_SIZE \
                or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size!r} is not a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}")
        layout = cls(page_size, tuple(regions_from_meta(regions, page_size)))
        if layout.total_pages > max_pages:
            raise ValueError(f"{layout.total_pages} pages exceed the limit of {max_pages}")
        return layout

    @property
    def total_pages(self) -> int:
        """One past the highest page number of any region."""
        return max((r.end_page for r in self.regions), default=0)

    @property
    def page_count(self) -> int:
        """Pages inside regions (holes between regions excluded)."""
        return sum(r.npages for r in self.regions)

    def as_json(self) -> dict[str, Any]:
        return {"page_size": self.page_size, "regions": [r.to_meta() for r in self.regions]}

    def page_numbers(self) -> np.ndarray:
        """Every page number inside the regions, ascending (uint64)."""
        if not self.regions:
            return np.empty(0, dtype=np.uint64)
        return np.concatenate([np.arange(r.first_page, r.end_page, dtype=np.uint64) for r in self.regions])

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        firsts = np.array([r.first_page for r in self.regions], dtype=np.uint64)
        return firsts, firsts + np.array([r.npages for r in self.regions], dtype=np.uint64)

    @cached_property
    def _gapless(self) -> bool:
        """Whether the regions cover one range of page numbers without holes."""
        firsts, ends = self._bounds
        return bool(firsts.size) and bool(np.all(firsts[1:] == ends[:-1]))

    def outside(self, page_numbers: np.ndarray) -> np.ndarray:
        """Boolean mask of the page numbers that fall in no region."""
        firsts, ends = self._bounds
        if self._gapless:
            return (page_numbers < firsts[0]) | (page_numbers >= ends[-1])
        index = np.searchsorted(firsts, page_numbers, side="right").astype(np.int64) - 1
        inside = index >= 0
        inside[inside] = page_numbers[inside] < ends[index[inside]]
        return ~inside


@dataclass(frozen=True)
class Mapping:
    """A writable mapping of a process: addresses [start, end), page aligned; for a mapping read from
    /proc/PID/maps also its file offset, device and inode (0 and "00:00" for private anonymous memory) and
    whether it is shared (MAP_SHARED)."""

    name: str
    start: int
    end: int
    offset: int = 0
    device: str = "00:00"
    inode: int = 0
    shared: bool = False


def layout_meta(regions: Sequence[Region], vanished: Iterable[tuple[int, int]] = ()) -> dict[str, Any]:
    """The ``meta`` of a LAYOUT batch: ``regions`` plus ``vanished`` [{first_page, npages}] ranges."""
    return {
        "regions": [region.to_meta() for region in regions],
        "vanished": [{"first_page": first, "npages": count} for first, count in vanished],
    }


def remap(regions: Sequence[Region], mappings: Sequence[Mapping], page_size: int,
          next_page: int) -> tuple[list[Region], list[tuple[int, int]], int]:
    """Fit the old regions onto the current mappings.

    Returns the new regions (sorted by address), the vanished page ranges as
    (first_page, npages), and the next unused page number. Pages keep their
    number as long as their address stays mapped under the same name.
    """
    survivors: list[Region] = []
    vanished: list[tuple[int, int]] = []
    for region in regions:
        end = region.start + region.npages * page_size
        pieces = [(max(region.start, m.start), min(end, m.end)) for m in mappings
                  if m.name == region.name and m.start < end and region.start < m.end]
        cursor = region.start
        for low, high in sorted(pieces):
            if low > cursor:
                vanished.append(_page_range(region, cursor, low, page_size))
            survivors.append(Region(region.name, low, region.first_page + (low - region.start) // page_size,
                                    (high - low) // page_size))
            cursor = high
        if cursor < end:
            vanished.append(_page_range(region, cursor, end, page_size))
    covered = sorted((r.start, r.start + r.npages * page_size) for r in survivors)
    fresh: list[Region] = []
    for mapping in mappings:
        for low, high in _uncovered(mapping.start, mapping.end, covered):
            npages = (high - low) // page_size
            fresh.append(Region(mapping.name, low, next_page, npages))
            next_page += npages
    return sorted(survivors + fresh, key=lambda r: r.start), vanished, next_page


def _page_range(region: Region, low: int, high: int, page_size: int) -> tuple[int, int]:
    return region.first_page + (low - region.start) // page_size, (high - low) // page_size


def _uncovered(start: int, end: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside the sorted, non-overlapping ``covered`` intervals."""
    parts = []
    cursor = start
    for low, high in covered:
        if high <= cursor or low >= end:
            continue
        if low > cursor:
            parts.append((cursor, low))
        cursor = max(cursor, high)
    if cursor < end:
        parts.append((cursor, end))
    return parts
