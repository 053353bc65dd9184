"""How process-src finds changed pages by digest: read every page that may hold data, compare with last time.

With the processes stopped, the pages of every tracked region are read
(private anonymous pages never written, neither present nor swapped by
PAGEMAP_SCAN, are zeros and not read); a page is changed when its digest
differs from the previous checkpoint's. ``copy=all`` reads into a copy of all
the tracked memory and compares after the processes resume (the shortest
pause, the Remus order); ``copy=changed`` compares chunk by chunk during the
pause and keeps only the changed pages (4 MiB of memory).

The interface process-src drives (another way of finding pages offers the
same): ``paused`` while the processes are stopped, ``resumed`` after, with
``forget``/``forget_process`` for pages and processes that are gone.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.errors import TrackerError
from stages.common.pages import digest_pages

from .proclayout import Tracked
from .uffd import PagemapScanner

CHUNK_PAGES = 1024  # read and digested at a time: 4 MiB, still in cache when digested

Reader = Callable[[int, list[tuple[int, int, int]], np.ndarray], None]
"""read(pid, runs of (address, npages, first row), out): fills ``out`` or raises TrackerError."""


def _runs(resident: np.ndarray | None, offset: int, count: int, start: int,
          page_size: int) -> list[tuple[int, int, int]]:
    """(address, npages, row) runs to read for rows offset..offset+count of a region; all of them if
    ``resident`` (sorted rows holding data) is None."""
    if resident is None:
        return [(start + offset * page_size, count, 0)]
    rows = resident[np.searchsorted(resident, offset):np.searchsorted(resident, offset + count)] - offset
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts = np.concatenate([rows[:1], rows[breaks]])
    lasts = np.concatenate([rows[breaks - 1], rows[-1:]])
    return [(start + (offset + int(first)) * page_size, int(last - first) + 1, int(first))
            for first, last in zip(firsts, lasts)]


class DigestTracking:
    """Changed pages by digest comparison (see the module docstring)."""

    name = "digest"

    def __init__(self, page_size: int, copy: str, read: Reader, warn: Callable[[str], None]):
        self.page_size = page_size
        self.copy = copy
        self._read = read
        self._warn = warn
        self.counters: dict[str, int] = {}
        self._digests = np.zeros(0, dtype=np.uint64)
        self._known = np.zeros(0, dtype=bool)
        self._chunk = np.zeros((CHUNK_PAGES, page_size), dtype=np.uint8)
        self._copy = np.zeros((0, page_size), dtype=np.uint8)  # copy=all: every page of the last checkpoint
        self._zero_digest = digest_pages(np.zeros((1, page_size), dtype=np.uint8))[0]
        self._scanners: dict[int, PagemapScanner | None] = {}
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._numbers: list[np.ndarray] = []
        self._data: list[np.ndarray] = []
        self._everything = False

    def forget(self, vanished: list[tuple[int, int]]) -> None:
        """These page ranges left the layout: a page number given out again is new."""
        for first, count in vanished:
            self._known[first:first + count] = False

    def forget_process(self, pid: int) -> None:
        scanner = self._scanners.pop(pid, None)
        if scanner is not None:
            scanner.close()

    def close(self) -> None:
        for pid in list(self._scanners):
            self.forget_process(pid)

    def paused(self, tracked: list[Tracked], next_page: int, everything: bool) -> None:
        """With the processes stopped: read the tracked regions' pages that may hold data, chunk by chunk.

        copy=changed compares each chunk while it is in cache and keeps only
        its changed pages; copy=all reads into a copy of everything and leaves
        the comparing to ``resumed``.
        """
        self._grow(next_page)
        self._pending, self._numbers, self._data, self._everything = [], [], [], everything
        total = sum(t.region.npages for t in tracked)
        if self.copy == "all" and len(self._copy) < total:
            self._copy = np.zeros((total, self.page_size), dtype=np.uint8)
        row = read = 0
        copy_runs: dict[int, list[tuple[int, int, int]]] = {}  # copy=all, by pid: read in as few calls as possible
        for item in tracked:
            region = item.region
            resident = self._resident_rows(item)
            for offset in range(0, region.npages, CHUNK_PAGES):
                count = min(CHUNK_PAGES, region.npages - offset)
                numbers = np.arange(region.first_page + offset, region.first_page + offset + count, dtype=np.int64)
                runs = _runs(resident, offset, count, region.start, self.page_size)
                pages = None  # nothing resident: all zeros, nothing to read
                if runs:
                    pages = self._copy[row:row + count] if self.copy == "all" else self._chunk[:count]
                    if sum(run[1] for run in runs) < count:
                        pages[:] = 0  # the pages never written read as zeros
                    read += sum(run[1] for run in runs)
                if self.copy == "all":
                    copy_runs.setdefault(item.pid, []).extend((address, npages, row + first)
                                                              for address, npages, first in runs)
                    self._pending.append((numbers, pages))
                else:
                    if pages is not None:
                        self._read(item.pid, runs, pages)
                    self._keep_changes(numbers, pages)
                row += count
        for pid, runs in copy_runs.items():
            if runs:
                self._read(pid, runs, self._copy)
        self.counters.update(read_pages=read, tracked_pages=total)

    def resumed(self) -> tuple[np.ndarray, np.ndarray]:
        """After the processes run again: the changed pages' numbers (uint64) and contents (owned copies)."""
        for numbers, pages in self._pending:  # copy=all: compare now
            self._keep_changes(numbers, pages)
        self._pending = []
        if not self._numbers:
            return np.empty(0, dtype=np.uint64), np.empty((0, self.page_size), dtype=np.uint8)
        numbers, data = np.concatenate(self._numbers).astype(np.uint64), np.concatenate(self._data)
        self._numbers, self._data = [], []
        return numbers, data

    def _keep_changes(self, numbers: np.ndarray, pages: np.ndarray | None) -> None:
        """Compare pages (None: all zero) with the last checkpoint's digests; keep the changed ones, copied."""
        digests = digest_pages(pages) if pages is not None else np.full(len(numbers), self._zero_digest)
        if self._everything:
            changed = np.arange(len(numbers))
        else:
            changed = np.flatnonzero(~self._known[numbers] | (self._digests[numbers] != digests))
        self._digests[numbers] = digests
        self._known[numbers] = True
        if len(changed):
            self._numbers.append(numbers[changed])
            self._data.append(np.take(pages, changed, axis=0) if pages is not None
                              else np.zeros((len(changed), self.page_size), dtype=np.uint8))

    def _resident_rows(self, item: Tracked) -> np.ndarray | None:
        """Sorted rows of a private anonymous region that hold data; None (read everything) for the others,
        whose absent pages are file or shared contents, not zeros."""
        if not item.anonymous:
            return None
        if item.pid not in self._scanners:
            try:
                self._scanners[item.pid] = PagemapScanner(item.pid)
            except TrackerError as exc:
                self._no_scanner(item.pid, exc)
        scanner = self._scanners[item.pid]
        if scanner is None:
            return None
        region = item.region
        try:
            addresses = scanner.resident(region.start, region.npages * self.page_size)
        except TrackerError as exc:  # a kernel without PAGEMAP_SCAN
            self._no_scanner(item.pid, exc)
            return None
        return ((addresses - np.uint64(region.start)) // np.uint64(self.page_size)).astype(np.int64)

    def _no_scanner(self, pid: int, exc: TrackerError) -> None:
        self.forget_process(pid)
        self._scanners[pid] = None
        self._warn(f"pid {pid}: reading every page, resident or not: {exc}")

    def _grow(self, next_page: int) -> None:
        if len(self._digests) < next_page:
            grown = max(next_page, 2 * len(self._digests))
            self._digests = np.resize(self._digests, grown)
            self._known = np.concatenate([self._known, np.zeros(grown - len(self._known), dtype=bool)])
