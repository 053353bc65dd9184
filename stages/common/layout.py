"""Layouts: tracked memory regions mapped onto dense page numbers.

A region covers the addresses [start, start + npages * page_size) and owns the
page numbers [first_page, first_page + npages). When a process's mappings
change, ``remap`` keeps the page numbers of every surviving address stable,
gives addresses that appeared fresh numbers, and lists the numbers that
vanished so the receiver can drop them.

A region made from a numpy array also names the array's ``dtype`` (numpy's
``dtype.str``, such as ``<f8``) and ``shape``, so a replica can give the same
array back (``array_spec`` checks such a pair wherever it comes from).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

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

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "start": self.start, "first_page": self.first_page,
                                "npages": self.npages}
        if self.dtype:
            meta.update(dtype=self.dtype, shape=list(self.shape))
        return meta


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
