"""Kernel dirty tracking of another process: a userfaultfd injected into it, driven from here.

With the target stopped by a ``ptrace.Tracer``, one thread of it is made to
call ``userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)`` (without
UFFD_USER_MODE_ONLY an unprivileged target gets EPERM); ``pidfd_getfd`` gives
us a copy of that descriptor, and UFFDIO_API / UFFDIO_REGISTER /
UFFDIO_WRITEPROTECT issued on our copy act on the *target's* address space.
``PAGEMAP_SCAN`` on /proc/PID/pagemap then lists the pages written since the
last scan and write-protects them again, in one call.

Facts the design follows:
- Async write-protection (UFFD_FEATURE_WP_ASYNC) never blocks the target: the
  kernel resolves the write fault itself and only clears the page's
  write-protect bit. Left armed after a crash of ours it is harmless: the
  target runs exactly as before. Its only traces are a descriptor slot in the
  target and the registration of its ranges (which makes the target's own
  UFFDIO_REGISTER of those ranges fail with EBUSY). ``detach()`` unregisters
  and closes the injected descriptor inside the target; a marker file (under
  /run/pagepipe, keyed by pid and process start time) lets the next
  ``attach()`` find and close one left by a crashed run.
- Write-protect bits live in this process's page tables: a write to shared
  memory through another process's mapping is invisible here, so shared
  mappings are not tracked by this class (process-src digests them).
- ``madvise(MADV_DONTNEED)`` empties a page-table entry, which a kernel may
  not report as written: the resident (PRESENT|SWAPPED) set is compared
  between scans and the pages that left it are reported as dropped (they read
  as zeros). Where the written scan does report such pages (this kernel, 6.18,
  with WP_UNPOPULATED: probed once at first use on our own memory), that
  second walk of the page tables is skipped.
- A range the target already registered with its own userfaultfd cannot be
  registered again (EBUSY): ``register`` says so and the caller digests it.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import TrackerError

from . import ptrace
from .injection_guard import Guardian, guarded_inject
from stages.common.layout import Region
from .uffd import (
    PagemapScanner, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_USER_MODE_ONLY, UffdError, UffdFile, syscall_number,
)

_SYS_CLOSE = 3
_SYS_PIDFD_GETFD = 438
_UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY
_UFFD_LINK = "anon_inode:[userfaultfd]"
_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def marker_directory() -> str:
    """Where the markers of injected descriptors live: /run/pagepipe, else a per-user temp folder."""
    for directory in ("/run/pagepipe", f"/tmp/pagepipe-{os.getuid()}"):
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            if os.access(directory, os.W_OK):
                return directory
        except OSError:
            continue
    raise TrackerError("no writable folder for userfaultfd markers (/run/pagepipe or /tmp)")


def prune_markers(directory: str) -> None:
    """Remove the markers of processes that no longer exist (a process left stopped and killed later)."""
    for name in os.listdir(directory):
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "uffd":
            continue
        try:
            if start_time(int(parts[1])) == parts[2]:
                continue
        except (ptrace.ThreadGone, ValueError, IndexError, OSError):
            pass
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def start_time(pid: int) -> str:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): pid + start time name one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except FileNotFoundError:
        raise ptrace.ThreadGone(f"process {pid} exited") from None
    return text[text.rindex(b")") + 2:].split()[19].decode()


def userfaultfd_descriptors(pid: int) -> list[int]:
    """The descriptor numbers of the target that are userfaultfds."""
    found = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise ptrace.ThreadGone(f"process {pid} exited") from None
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == _UFFD_LINK:
                found.append(int(name))
        except OSError:
            continue
    return sorted(found)


def _pidfd_getfd(pid: int, target_fd: int) -> int:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ptrace.ThreadGone(f"process {pid} exited") from None
    try:
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            code = ctypes.get_errno()
            raise TrackerError(f"pidfd_getfd of descriptor {target_fd} of pid {pid}: {os.strerror(code)}")
        os.set_inheritable(fd, False)
        return fd
    finally:
        os.close(pidfd)


@dataclass
class Scan:
    """What one checkpoint's scan of the tracked ranges found (addresses, uint64)."""

    written: np.ndarray
    dropped: np.ndarray  # left the resident set since the last scan: they read as zeros now
    lost: list[tuple[int, int]] = field(default_factory=list)  # ranges no longer armed (remapped): send whole


class RemoteUffd:
    """A userfaultfd inside ``pid``, armed on ranges of its memory, scanned for written pages.

    Every method must be called while the target is stopped by ``tracer``
    (``stops``: the freezer's tid -> Stop), so nothing runs between a scan and
    the copy of the pages it found. The tracer is shared with the freezer.
    """

    def __init__(self, pid: int, tracer: ptrace.Tracer, guardian: Guardian | None = None):
        self.pid = pid
        self.tracer = tracer
        self.target_fd = -1
        self._uffd: UffdFile | None = None
        self._scanner: PagemapScanner | None = None
        self._marker = ""
        self._armed: dict[int, int] = {}  # start -> end of each registered range
        self._resident: dict[int, np.ndarray] = {}  # start -> resident [start, end) ranges at the last scan
        self.stale_closed: list[int] = []
        self._guardian = guardian  # shared by the caller (who closes it), or ours, started at attach
        self._own_guardian = guardian is None

    # -- attach / detach ----------------------------------------------------------------------

    def attach(self, stops: dict[int, ptrace.Stop]) -> None:
        """Close a stale descriptor of a crashed run, inject a userfaultfd, take our copy, enable async WP."""
        directory = marker_directory()
        prune_markers(directory)
        self._marker = os.path.join(directory, f"uffd-{self.pid}-{start_time(self.pid)}")
        if self._guardian is None:
            self._guardian = Guardian()
        self._close_stale(stops)
        fd = self._inject(stops, syscall_number(), (_UFFD_FLAGS,))
        if fd < 0:
            hint = " (the target's sysctl vm.unprivileged_userfaultfd / seccomp?)" if -fd == errno.EPERM else ""
            raise TrackerError(f"userfaultfd() inside pid {self.pid} failed: {os.strerror(-fd)}{hint}")
        self.target_fd = fd
        try:
            with open(self._marker, "w") as marker:
                marker.write(str(fd))
            self._uffd = UffdFile(_pidfd_getfd(self.pid, fd))
            try:
                self._uffd.api(_FEATURES | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
            except UffdError as exc:  # an unknown feature leaves the handshake undone: ask for less
                if exc.errno != errno.EINVAL:
                    raise
                self._uffd.api(_FEATURES)
            self._scanner = PagemapScanner(self.pid)
        except BaseException:
            self.detach(stops)
            raise

    def detach(self, stops: dict[int, ptrace.Stop]) -> None:
        """Unregister every range, close the injected descriptor inside the target and ours.

        Safe to call more than once and on a target that exited."""
        if self._uffd is not None:
            for start, end in list(self._armed.items()):
                self._uffd.unregister(start, end - start, missing_ok=True)
        self._armed.clear()
        self._resident.clear()
        if self.target_fd >= 0:
            try:
                self._inject(stops, _SYS_CLOSE, (self.target_fd,))
            except ptrace.ThreadGone:
                pass
            self.target_fd = -1
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None
        if self._marker:
            try:
                os.unlink(self._marker)
            except FileNotFoundError:
                pass
            self._marker = ""

    def abandon(self) -> None:
        """The target exited: close our copy and forget it (its own descriptor went with it)."""
        self.target_fd = -1
        self._armed.clear()
        self._resident.clear()
        self.detach({})
        self.close()

    def disarm(self) -> None:
        """Unregister every range and close our copy, without touching the target: its descriptor stays, and
        the marker file with it, for the next attach to close (for a target that must not run)."""
        self.target_fd = -1
        self._marker = ""  # kept on disk
        self.detach({})

    def _close_stale(self, stops: dict[int, ptrace.Stop]) -> None:
        """A marker of this very process names a descriptor a crashed run injected: close it if it still is a uffd."""
        try:
            with open(self._marker) as marker:
                stale = int(marker.read().strip() or -1)
        except (FileNotFoundError, ValueError):
            return
        if stale >= 0 and stale in userfaultfd_descriptors(self.pid):
            self._inject(stops, _SYS_CLOSE, (stale,))
            self.stale_closed.append(stale)
        os.unlink(self._marker)

    def _inject(self, stops: dict[int, ptrace.Stop], number: int, arguments: tuple[int, ...]) -> int:
        """Run one system call in a stopped thread of the target (the main thread if it can)."""
        candidates = sorted((stop for stop in stops.values() if stop.kind != "exited"),
                            key=lambda stop: stop.tid != self.pid)
        if not candidates:
            raise ptrace.ThreadGone(f"process {self.pid} exited")
        marker = self._marker if number == syscall_number() else ""
        assert self._guardian is not None
        return self.tracer.call(guarded_inject, self._guardian, self.pid, candidates[0], number, arguments, marker)

    def close(self) -> None:
        """End our injection guardian, if it is ours (after ``detach``)."""
        if self._guardian is not None and self._own_guardian:
            self._guardian.close()
        self._guardian = None

    # -- ranges -------------------------------------------------------------------------------

    @property
    def armed(self) -> dict[int, int]:
        return dict(self._armed)

    def register(self, start: int, length: int) -> None:
        """Arm async write tracking on [start, start+length): every page counts as clean from now on.

        TrackerError (with the kernel's reason) if the range cannot be armed:
        EBUSY means the target registered it with its own userfaultfd."""
        if self._uffd is None:
            raise TrackerError(f"the userfaultfd of pid {self.pid} is not attached")
        self._uffd.register(start, length)
        self._armed[start] = start + length
        self._resident[start] = self._resident_ranges(start, length)

    def forget(self, start: int) -> None:
        """Stop tracking a range that left the target's layout (its registration went with the mapping)."""
        end = self._armed.pop(start, None)
        self._resident.pop(start, None)
        if end is not None and self._uffd is not None:
            self._uffd.unregister(start, end - start, missing_ok=True)

    def rekey(self, keep: dict[tuple[int, int], int]) -> None:
        """Track exactly the ranges of ``keep`` (each inside the armed range starting at its value: they stay
        registered); armed ranges none of them lies in left the layout and are unregistered."""
        if len(keep) == len(self._armed) and all(parent == start and self._armed.get(start) == end
                                                 for (start, end), parent in keep.items()):
            return  # the same ranges as before: nothing to move
        armed, resident = self._armed, self._resident
        self._armed = {start: end for start, end in keep}
        self._resident = {start: _clip(resident[parent], start, end) for (start, end), parent in keep.items()}
        for start, end in armed.items():
            if start not in keep.values() and self._uffd is not None:
                self._uffd.unregister(start, end - start, missing_ok=True)

    def scan(self) -> Scan:
        """Pages written, and pages dropped from memory, in every armed range since the last scan."""
        assert self._scanner is not None
        written: list[np.ndarray] = []
        dropped: list[np.ndarray] = []
        lost: list[tuple[int, int]] = []
        compare_resident = not dropped_pages_show_as_written()
        # Touching ranges are scanned in one call, unless each needs its own resident walk.
        groups = [[item] for item in sorted(self._armed.items())] if compare_resident else _touching(self._armed)
        for group in groups:
            start, end = group[0][0], group[-1][1]
            try:
                # before the written scan re-arms (fills) pages
                now = self._resident_ranges(start, end - start) if compare_resident else None
                written.append(self._scanner.written(start, end - start))
            except UffdError as exc:
                if exc.errno != errno.EPERM:
                    raise
                # Part of it is no longer armed (munmap + mmap at the same place); pages the call had already
                # re-armed in the group are not listed: every range of the group is sent again.
                for lost_start, lost_end in group:
                    lost.append((lost_start, lost_end))
                    self.forget(lost_start)
                continue
            if now is None:
                continue
            before = self._resident[start]
            if not np.array_equal(now, before):
                dropped.append(_pages_left(before, now, self._scanner.page_size))
            self._resident[start] = now
        empty = np.empty(0, dtype=np.uint64)
        return Scan(np.concatenate([empty, *written]), np.concatenate([empty, *dropped]), lost)

    def _resident_ranges(self, start: int, length: int) -> np.ndarray:
        assert self._scanner is not None
        return self._scanner.resident_ranges(start, length)

    def resident_rows(self, start: int, length: int) -> np.ndarray:
        """Sorted page rows of [start, start+length) holding data (present or swapped): the others are zeros."""
        assert self._scanner is not None
        addresses = self._scanner.resident(start, length)
        return ((addresses - np.uint64(start)) // np.uint64(self._scanner.page_size)).astype(np.int64)


def _touching(armed: dict[int, int]) -> list[list[tuple[int, int]]]:
    """Armed (start, end) ranges in address order, grouped where each ends where the next starts."""
    groups: list[list[tuple[int, int]]] = []
    for start, end in sorted(armed.items()):
        if groups and groups[-1][-1][1] == start:
            groups[-1].append((start, end))
        else:
            groups.append([(start, end)])
    return groups


def _clip(ranges: np.ndarray, start: int, end: int) -> np.ndarray:
    """[start, end) address ranges cut to [start, end)."""
    if not len(ranges):
        return ranges
    clipped = np.clip(ranges, np.uint64(start), np.uint64(end))
    return clipped[clipped[:, 1] > clipped[:, 0]]


_DROPPED_SHOW_AS_WRITTEN: bool | None = None


def dropped_pages_show_as_written() -> bool:
    """Whether this kernel's written-page scan also reports pages emptied by MADV_DONTNEED (probed once on a
    mapping of our own). Then the resident-set comparison, a second walk of every page table, is skipped."""
    global _DROPPED_SHOW_AS_WRITTEN
    if _DROPPED_SHOW_AS_WRITTEN is None:
        _DROPPED_SHOW_AS_WRITTEN = _probe_dropped_pages()
    return _DROPPED_SHOW_AS_WRITTEN


def _probe_dropped_pages() -> bool:
    import mmap

    from .uffd import WriteTracker
    page = mmap.PAGESIZE
    memory = mmap.mmap(-1, 4 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = (ctypes.c_char * len(memory)).from_buffer(memory)
    try:
        start = ctypes.addressof(buffer)
        memory[:] = b"x" * len(memory)
        tracker = WriteTracker()
        try:
            tracker.register(start, len(memory))
            _libc.madvise(ctypes.c_void_p(start + page), ctypes.c_size_t(page), 4)  # MADV_DONTNEED
            return bool(int(start + page) in set(tracker.collect(start, len(memory)).tolist()))
        finally:
            tracker.close()
    except TrackerError:
        return False
    finally:
        del buffer
        memory.close()


def _pages_left(before: np.ndarray, now: np.ndarray, page_size: int) -> np.ndarray:
    """Addresses of the pages in the [start, end) ranges ``before`` but not in ``now``."""
    if not len(before):
        return np.empty(0, dtype=np.uint64)
    low = int(before[:, 0].min())
    high = int(before[:, 1].max())
    count = (high - low) // page_size
    if len(now):
        high = max(high, int(now[:, 1].max()))
        low = min(low, int(now[:, 0].min()))
        count = (high - low) // page_size

    def bitmap(ranges: np.ndarray) -> np.ndarray:
        marks = np.zeros(count + 1, dtype=np.int32)
        if len(ranges):
            np.add.at(marks, ((ranges[:, 0] - low) // page_size).astype(np.int64), 1)
            np.add.at(marks, ((ranges[:, 1] - low) // page_size).astype(np.int64), -1)
        return np.cumsum(marks[:-1]) > 0

    left = bitmap(before) & ~bitmap(now)
    return (np.flatnonzero(left).astype(np.uint64) * np.uint64(page_size)) + np.uint64(low)


@dataclass
class Plan:
    """process-src's uffd mode at one checkpoint: which regions to digest, send whole, or read in part."""

    digest: dict[int, str] = field(default_factory=dict)  # first page of a region that cannot be armed -> why
    whole: list[tuple[Region, np.ndarray]] = field(default_factory=list)  # (region, resident rows): every page
    pages: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))  # page numbers to read
    addresses: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))  # ... at these addresses


class KernelDirtyPages:
    """Which pages of another process's layout changed, by its injected userfaultfd (process-src mode=uffd).

    ``plan(regions)`` (private anonymous regions of the process), called with
    the target stopped, registers the regions not seen before (they are sent
    whole once), scans the others for written and dropped pages, and names the
    regions it cannot arm, with the reason, for the caller to digest. A region
    that stopped being armed (its mapping was replaced at the same address) is
    sent whole again.
    """

    def __init__(self, pid: int, tracer: ptrace.Tracer, guardian: Guardian | None = None):
        self.uffd = RemoteUffd(pid, tracer, guardian)
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._untracked: dict[tuple[int, int], str] = {}  # (start, end) of regions that cannot be armed -> why

    def attach(self, stops: dict[int, ptrace.Stop]) -> None:
        self.uffd.attach(stops)

    def detach(self, stops: dict[int, ptrace.Stop]) -> None:
        self.uffd.detach(stops)

    def abandon(self) -> None:
        """The process exited: close our side only."""
        self.uffd.abandon()

    def disarm(self) -> None:
        """Unregister everything and close our side, leaving the descriptor in the target (see RemoteUffd.disarm)."""
        self.uffd.disarm()

    def close(self) -> None:
        self.uffd.close()

    def plan(self, regions: list[Region]) -> Plan:
        plan = Plan()
        page = np.uint64(self.page_size)
        armed = self.uffd.armed
        untracked, self._untracked = self._untracked, {}
        scanned: list[Region] = []
        keep: dict[tuple[int, int], int] = {}  # each tracked region -> the armed range it lies in
        for region in regions:
            end = region.start + region.npages * self.page_size
            reason = _containing(region.start, end, untracked)
            parent = _containing(region.start, end, armed) if not reason else None
            if parent is not None:
                scanned.append(region)
                keep[(region.start, end)] = parent
                continue
            if not reason:
                try:
                    plan.whole.append((region, self._arm(region)))
                    keep[(region.start, end)] = region.start
                    continue
                except UffdError as exc:
                    reason = ("registered with the target's own userfaultfd" if exc.errno == errno.EBUSY
                              else f"cannot be armed: {exc}")
            self._untracked[(region.start, end)] = reason
            plan.digest[region.first_page] = reason
        self.uffd.rekey(keep)
        scan = self.uffd.scan()
        fresh = {region.start: (index, region) for index, (region, _) in enumerate(plan.whole)}
        for start, _end in scan.lost:  # replaced at the same address: not armed any more, send it again
            if start in fresh:  # armed just now, in the same scan call as a lost neighbour: arm it again
                position, region = fresh[start]
                plan.whole[position] = (region, self._arm(region))
                continue
            region = next(region for region in scanned if region.start == start)
            scanned.remove(region)
            plan.whole.append((region, self._arm(region)))
        addresses = np.union1d(scan.written, scan.dropped)
        if len(addresses) and scanned:
            scanned.sort(key=lambda region: region.start)
            starts = np.array([region.start for region in scanned], dtype=np.uint64)
            ends = starts + np.array([region.npages for region in scanned], dtype=np.uint64) * page
            index = np.searchsorted(starts, addresses, side="right") - 1
            inside = (index >= 0) & (addresses < ends[np.maximum(index, 0)])
            addresses, index = addresses[inside], index[inside]
            firsts = np.array([region.first_page for region in scanned], dtype=np.uint64)
            plan.pages = firsts[index] + (addresses - starts[index]) // page
            plan.addresses = addresses
        return plan

    def arm_new(self, ranges: list[tuple[int, int]]) -> None:
        """Arm the (start, end) ranges that touch no armed range yet (ahead of a live copy); a range the kernel
        refuses is left for the next ``plan`` to name, and one overlapping an armed range for it to arm."""
        armed = self.uffd.armed
        for start, end in ranges:
            if any(low < end and start < high for low, high in armed.items()):
                continue
            try:
                self.uffd.register(start, end - start)
            except UffdError:
                continue

    def _arm(self, region: Region) -> np.ndarray:
        """Register a region; returns its resident rows from before (the rest reads as zeros)."""
        length = region.npages * self.page_size
        resident = self.uffd.resident_rows(region.start, length)
        self.uffd.register(region.start, length)
        return resident


def _containing(start: int, end: int, ranges: dict) -> Any:
    """The value for the range of ``ranges`` containing [start, end) (None if none): keys are (start, end)
    pairs, or starts with the end as the value (the value is then the start)."""
    for key, value in ranges.items():
        low, high = key if isinstance(key, tuple) else (key, value)
        if low <= start and end <= high:
            return value if isinstance(key, tuple) else key
    return None
