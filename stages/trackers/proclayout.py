"""The layout of a set of processes: each private mapping per process, each shared object once.

Private mappings (heap, stacks, private file mappings, private anonymous
memory) belong to one process: their regions are named ``PID:NAME`` and keep
their page numbers while their addresses stay mapped (``layout.remap`` per
process). A writable shared mapping (MAP_SHARED anonymous memory, SysV and
POSIX shared memory, a shared file mapping) is identified by the device and
inode /proc/PID/maps gives it, and its pages by their offset in that object:
mapped by several processes, or several times, it is tracked and sent once,
as regions named ``shared DEV:INODE@OFFSET NAME`` (OFFSET: of the region's
first page in the object, in hex) whose ``start`` is the address in the
process it is read from (the member with the lowest pid mapping that offset).
The same offset keeps its page number when that process changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.common.layout import Mapping, Region, remap


@dataclass(frozen=True)
class Tracked:
    """A region of the layout, the process its pages are read from, and whether pages it never wrote are zeros
    (private anonymous memory: PAGEMAP_SCAN may skip them; a file's or shared object's pages hold data)."""

    region: Region
    pid: int
    anonymous: bool


SharedKey = tuple[str, int, str]
"""(device, inode, name): SysV segments show their id as inode on the device of MAP_SHARED anonymous memory,
whose inode numbers are of another series; the name (/SYSV... or /dev/zero) keeps them apart."""


class ProcessLayout:
    """Dense page numbers for the writable memory of a changing set of processes."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.next_page = 0
        self._private: dict[int, list[Region]] = {}
        self._shared: dict[SharedKey, list[Region]] = {}  # start and end in bytes of the object, not addresses

    def update(self, mappings: dict[int, list[Mapping]]) -> tuple[list[Tracked], list[tuple[int, int]]]:
        """Fit the layout onto the mappings of each process now (processes absent from ``mappings`` are gone).

        Returns the tracked regions (by page number) and the vanished page ranges (first_page, npages).
        """
        vanished: list[tuple[int, int]] = []
        tracked: list[Tracked] = []
        for pid in sorted(set(self._private) - set(mappings)):
            vanished += [(r.first_page, r.npages) for r in self._private.pop(pid)]
        for pid in sorted(mappings):
            private = [m for m in mappings[pid] if not _is_shared(m)]
            regions, gone, self.next_page = remap(self._private.get(pid, []), private, self.page_size, self.next_page)
            self._private[pid] = regions
            vanished += gone
            tracked += [Tracked(Region(f"{pid}:{r.name}", r.start, r.first_page, r.npages), pid,
                                _is_anonymous(r.name)) for r in regions]
        views = _shared_views(mappings)
        for key in sorted(set(self._shared) - set(views)):
            vanished += [(r.first_page, r.npages) for r in self._shared.pop(key)]
        for key in sorted(views):
            extents = _union([Mapping(m.name, m.offset, m.offset + m.end - m.start) for _, m in views[key]])
            regions, gone, self.next_page = remap(self._shared.get(key, []), extents, self.page_size, self.next_page)
            self._shared[key] = regions
            vanished += gone
            for region in regions:
                tracked += self._readers(key, region, views[key])
        return sorted(tracked, key=lambda t: t.region.first_page), vanished

    def _readers(self, key: SharedKey, region: Region, views: list[tuple[int, Mapping]]) -> list[Tracked]:
        """``region`` (in object offsets) cut into pieces, each read through the lowest-pid process mapping it."""
        pieces = []
        cursor, end = region.start, region.start + region.npages * self.page_size
        while cursor < end:
            pid, view = min(((pid, m) for pid, m in views
                             if m.offset <= cursor < m.offset + m.end - m.start), key=lambda pm: (pm[0], pm[1].start))
            upto = min(end, view.offset + view.end - view.start)
            first = region.first_page + (cursor - region.start) // self.page_size
            name = f"shared {key[0]}:{key[1]}@{cursor:#x} {region.name}"
            pieces.append(Tracked(Region(name, view.start + cursor - view.offset, first,
                                         (upto - cursor) // self.page_size), pid, False))
            cursor = upto
        return pieces


def _is_shared(mapping: Mapping) -> bool:
    return mapping.shared and mapping.inode != 0


def _is_anonymous(name: str) -> bool:
    return name.startswith("[")  # [heap], [stack], [anon]: no file behind it


def private_anonymous(mappings: list[Mapping]) -> list[Mapping]:
    """The mappings whose regions the layout marks ``anonymous`` (heap, stacks, private anonymous memory)."""
    return [m for m in mappings if not _is_shared(m) and _is_anonymous(m.name)]


def _shared_views(mappings: dict[int, list[Mapping]]) -> dict[SharedKey, list[tuple[int, Mapping]]]:
    views: dict[SharedKey, list[tuple[int, Mapping]]] = {}
    for pid, maps in mappings.items():
        for mapping in maps:
            if _is_shared(mapping):
                views.setdefault((mapping.device, mapping.inode, mapping.name), []).append((pid, mapping))
    return views


def _union(extents: list[Mapping]) -> list[Mapping]:
    """Overlapping or touching extents of one object merged (named after the first)."""
    merged: list[Mapping] = []
    for extent in sorted(extents, key=lambda m: m.start):
        if merged and extent.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Mapping(last.name, last.start, max(last.end, extent.end))
        else:
            merged.append(extent)
    return merged
