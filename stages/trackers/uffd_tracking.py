"""How process-src finds changed pages in the kernel (mode=uffd): the written pages, not every page.

Each process of the set gets a userfaultfd injected on its first checkpoint
(remote_uffd.py); its private anonymous regions (heap, stacks, anonymous
mappings) are armed with async write-protect the first time they are seen
and sent whole then; at every later checkpoint, with the processes stopped,
PAGEMAP_SCAN lists the pages written (and dropped by MADV_DONTNEED) since the
last one, and only those are read. The pause follows the dirty pages, not
the size of the process. Pages are read during the pause (``copy=`` plays no
part for these regions) and handed over as they are.

A checkpoint that sends everything (the first, a resync) is copied while the
processes run: ``arm`` (in a short stop: inject, arm what is not armed yet),
then ``copy_live`` reads every resident page of the armed ranges with the
processes running, then the pages written during that pass (listed and
re-protected by the written scan; a few passes, as live migration's pre-copy
does), and the checkpoint's pause re-reads only the pages written (or
dropped) since the last scan, and any page a live read was refused (its
mapping changed meanwhile). No write is missed: a page's write-protection is
armed, or re-armed by a scan (which flushes the TLBs before it returns),
before a pass reads it, so a later write is listed by a later scan. Ranges
that appear after the arming stop are read whole in the pause.

Digested instead (DigestTracking, as in mode=digest, ``copy=`` applies), with
the reason warned once per mapping:
- shared mappings: a write through another process's mapping is invisible to
  this process's page tables;
- file-backed private mappings (and hugetlbfs ones): a change of the file
  shows through the pages the process never wrote, which no write-protection
  sees;
- ranges the process registered with its own userfaultfd (EBUSY), or any the
  kernel refuses to arm;
- every region of a process the injection fails for (mode=auto: with a
  warning; mode=uffd: an error).

``close()`` disarms and closes the injected descriptor in every process,
stopping each briefly with the freezer's tracer; a process that exited needs
nothing. A process left stopped (``stop-at-end=true``, or stopped by someone
else) is only disarmed: its descriptor stays, noted in the marker file for
the next attach to close, because running even one injected close() in it
lets the kernel update the thread's rseq area (the current CPU), and the
stopped process must stay byte-identical to its final checkpoint. Same interface as DigestTracking: ``paused`` / ``resumed`` /
``forget`` / ``forget_process`` / ``close`` / ``counters``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.errors import TrackerError

from . import ptrace
from .digest_tracking import DigestTracking, Reader
from .injection_guard import Guardian, sigstop_pending

from stages.common.layout import Mapping, Region

from .procmem import ProcessGone, read_pages, thread_states
from .proclayout import Tracked, private_anonymous
from .remote_uffd import KernelDirtyPages, dropped_pages_show_as_written

UNTRACKED_SHARED = "shared memory: a write through another process's mapping is invisible to this one's page tables"
UNTRACKED_FILE = ("file-backed: a change of the file shows through the pages the process never wrote, unseen by "
                  "write-protection")
LIVE_PASSES = 4
"""Passes of a live copy at most: the first copies every resident page, each later one the pages written during
the one before, while more than LIVE_ENOUGH were."""
LIVE_ENOUGH = 1024
"""Pages written during a live pass few enough to leave to the pause."""


@dataclass
class LiveCopy:
    """An armed range [start, end) of a process copied while it ran: rows of pages, and the addresses whose read
    the kernel refused (their mapping changed meanwhile), to read again in the pause."""

    start: int
    end: int
    pages: np.ndarray
    refused: np.ndarray


class UffdTracking:
    """Changed pages by the kernel's write tracking, digests where it cannot track (module docstring)."""

    name = "uffd"

    def __init__(self, page_size: int, copy: str, read: Reader, warn: Callable[[str], None],
                 tracer: Callable[[], ptrace.Tracer | None], stops: Callable[[int], dict[int, ptrace.Stop]],
                 strict: bool):
        self.page_size = page_size
        self._read = read
        self._warn = warn
        self._tracer = tracer
        self._stops = stops
        self._strict = strict
        self.digest = DigestTracking(page_size, copy, read, warn)
        self.counters = self.digest.counters
        self._kernel: dict[int, KernelDirtyPages | None] = {}  # None: this process is digested whole
        self._guardian = Guardian()  # one for every injection, started now: ready before the first pause
        self._warned: set[str] = set()
        self._new_untracked: dict[str, list[str]] = {}
        self._numbers: list[np.ndarray] = []
        self._data: list[np.ndarray] = []
        self._live: dict[int, list[LiveCopy]] = {}

    # -- the interface process-src drives --------------------------------------------------------

    def forget(self, vanished: list[tuple[int, int]]) -> None:
        self.digest.forget(vanished)

    def forget_process(self, pid: int) -> None:
        """The process exited: its descriptor went with it; close ours."""
        kernel = self._kernel.pop(pid, None)
        if kernel is not None:
            kernel.abandon()
        self._live.pop(pid, None)
        self.digest.forget_process(pid)

    def arm(self, mappings: dict[int, list[Mapping]]) -> None:
        """With the processes stopped, ahead of a checkpoint that sends everything: inject where not done yet and
        arm every private anonymous mapping not armed yet, for ``copy_live`` to copy once they run again."""
        for pid, maps in mappings.items():
            try:
                kernel = self._attached(pid)
            except ProcessGone:
                continue  # exited as it was being stopped
            if kernel is not None:
                kernel.arm_new([(m.start, m.end) for m in private_anonymous(maps)])

    def ready(self) -> None:
        """Before the stop that arms: what would lengthen that pause is done now, with the processes running
        (the injection guardian's start-up, the kernel probe of the written scan)."""
        try:
            self._guardian.wait_ready()
        except TrackerError:
            pass  # a dead guardian is replaced, or the injection says why, in _attached
        dropped_pages_show_as_written()

    def copy_live(self) -> None:
        """With the processes running: copy the resident pages of every armed range, then, pass after pass, the
        pages written during the last one (the written scan lists and re-protects them), until few are left
        for the pause. Pages written after the last scan are listed by the pause's scan."""
        self._live = {}
        copied = last = 0
        for pid, kernel in self._kernel.items():
            if kernel is None:
                continue
            copies = []
            try:
                for start, end in sorted(kernel.uffd.armed.items()):
                    rows = kernel.uffd.resident_rows(start, end - start)
                    pages = np.zeros(((end - start) // self.page_size, self.page_size), dtype=np.uint8)
                    refused = read_pages(pid, _row_runs(start, rows, self.page_size), self.page_size, pages)
                    copies.append(LiveCopy(start, end, pages, np.array(refused, dtype=np.uint64)))
                    last += len(rows)
            except TrackerError:
                continue  # exited, or its memory unreadable meanwhile: the pause reads it whole, or says why
            self._live[pid] = copies
        passes = 1
        while last > LIVE_ENOUGH and passes < LIVE_PASSES:
            copied += last
            last = sum(self._copy_written_live(pid) for pid in list(self._live))
            passes += 1
        self.counters.update(live_copied_pages=copied + last, live_passes=passes)

    def _copy_written_live(self, pid: int) -> int:
        """One more live pass over a process: read again the pages written (or dropped) since the last scan;
        how many. Its live copy is dropped (the pause reads it whole) if the scan or a read fails, since a
        failed scan may have re-protected pages it did not list."""
        kernel, copies = self._kernel.get(pid), self._live[pid]
        try:
            if kernel is None:
                raise TrackerError("not tracked")
            scan = kernel.uffd.scan()
            lost = {start for start, _ in scan.lost}  # replaced meanwhile: the pause sends it whole
            copies[:] = [live for live in copies if live.start not in lost]
            again = np.union1d(scan.written, scan.dropped)
            for live in copies:
                inside = again[(again >= live.start) & (again < live.end)]
                runs = [(address, count, (address - live.start) // self.page_size)
                        for address, count, _ in _address_runs(inside, self.page_size)]
                refused = read_pages(pid, runs, self.page_size, live.pages)
                live.refused = np.union1d(live.refused, np.array(refused, dtype=np.uint64))
            return len(again)
        except (TrackerError, ptrace.ThreadGone):
            del self._live[pid]
            return 0

    def paused(self, tracked: list[Tracked], next_page: int, everything: bool) -> None:
        """With the processes stopped: read the written pages of armed regions, digest the rest."""
        self._numbers, self._data = [], []
        digested: list[Tracked] = []
        by_pid: dict[int, list[Tracked]] = {}
        for item in tracked:
            reason = self._untrackable(item)
            if reason:
                self._note(item, reason)
                digested.append(item)
            else:
                by_pid.setdefault(item.pid, []).append(item)
        written = armed_pages = pause_read = 0
        for pid, items in by_pid.items():
            kernel = self._attached(pid)
            if kernel is None:
                digested += items
                continue
            try:
                plan = kernel.plan([item.region for item in items])
            except ptrace.ThreadGone:
                raise ProcessGone(pid) from None
            for item in items:
                if item.region.first_page in plan.digest:
                    self._note(item, plan.digest[item.region.first_page])
                    digested.append(item)
            whole = list(plan.whole)
            if everything:  # every armed region goes whole (resync); the scan above re-armed the written pages
                sent = {region.first_page for region, _ in whole}
                for item in items:
                    region = item.region
                    if region.first_page in sent or region.first_page in plan.digest:
                        continue
                    live = self._live_copy(pid, region)
                    if live is None:
                        whole.append((region, kernel.uffd.resident_rows(region.start,
                                                                        region.npages * self.page_size)))
                    else:
                        pause_read += self._patch(pid, region, *live, plan.addresses)
            else:
                self._read_addresses(pid, plan.pages, plan.addresses)
                written += len(plan.pages)
                pause_read += len(plan.pages)
            for region, resident in whole:
                self._read_whole(pid, region, resident)
                pause_read += len(resident)
            armed_pages += sum(item.region.npages for item in items if item.region.first_page not in plan.digest)
        self._live = {}
        self._warn_new()
        self.digest.paused(sorted(digested, key=lambda t: t.region.first_page), next_page, everything)
        self.counters.update(written_pages=written, armed_pages=armed_pages,
                             tracked_pages=self.counters.get("tracked_pages", 0) + armed_pages,
                             pause_read_pages=pause_read + self.counters.get("read_pages", 0))

    def resumed(self) -> tuple[np.ndarray, np.ndarray]:
        numbers, data = self.digest.resumed()
        if self._numbers:
            numbers = np.concatenate([numbers, *self._numbers]).astype(np.uint64)
            data = np.concatenate([data, *self._data])
            self._numbers, self._data = [], []
        return numbers, data

    def close(self) -> None:
        """Disarm and close the injected descriptor in every process still there (stopping each briefly)."""
        tracer = self._tracer()
        for pid, kernel in list(self._kernel.items()):
            if kernel is None:
                continue
            try:
                if tracer is None:
                    raise TrackerError("no tracer to stop it with")
                if _let_stop_settle(pid):  # left stopped: stays byte-identical to its last checkpoint
                    kernel.disarm()
                    continue
                stops = tracer.stop_threads(pid)
                try:
                    kernel.detach(stops)
                finally:
                    tracer.release_threads(stops)
            except (ptrace.ThreadGone, ProcessGone):
                kernel.abandon()
            except TrackerError as exc:
                kernel.abandon()
                self._warn(f"pid {pid}: could not close the userfaultfd injected into it ({exc}); it is harmless "
                           f"(async write-protect) and the next attach closes it")
            finally:
                kernel.close()
        self._kernel.clear()
        self.digest.close()
        self._guardian.close()

    # -- parts -----------------------------------------------------------------------------------

    def _untrackable(self, item: Tracked) -> str:
        if item.anonymous:
            return ""
        return UNTRACKED_SHARED if item.region.name.startswith("shared ") else UNTRACKED_FILE

    def _note(self, item: Tracked, reason: str) -> None:
        """Remember a region digested for ``reason``; warned once per mapping, grouped (see _warn_new)."""
        name = item.region.name
        if name not in self._warned:
            self._warned.add(name)
            self._new_untracked.setdefault(reason, []).append(name)

    def _warn_new(self) -> None:
        for reason, names in self._new_untracked.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            self._warn(f"digested, not tracked by the kernel ({reason}): {shown}")
        self._new_untracked = {}

    def _attached(self, pid: int) -> KernelDirtyPages | None:
        """The process's kernel tracking, injected on first use; None where that failed (mode=auto)."""
        if pid in self._kernel:
            return self._kernel[pid]
        tracer = self._tracer()
        try:
            if tracer is None:
                raise TrackerError("the processes are stopped with SIGSTOP (someone else traces them), and "
                                   "injecting a userfaultfd needs ptrace")
            if not self._guardian.alive:  # killed by someone: a new one for the injections to come
                self._guardian.close()
                self._guardian = Guardian()
            kernel = KernelDirtyPages(pid, tracer, self._guardian)
            try:
                kernel.attach(self._stops(pid))
            except BaseException:
                kernel.close()
                raise
        except ptrace.ThreadGone:
            raise ProcessGone(pid) from None
        except TrackerError as exc:
            if self._strict:
                raise TrackerError(f"mode=uffd: pid {pid}: {exc}") from None
            self._warn(f"pid {pid}: finding changed pages by digest (mode=auto): kernel tracking failed: {exc}")
            self._kernel[pid] = None
            return None
        if kernel.uffd.stale_closed:
            self._warn(f"pid {pid}: closed userfaultfd {kernel.uffd.stale_closed} left by an earlier run")
        self._kernel[pid] = kernel
        return kernel

    def _read_addresses(self, pid: int, pages: np.ndarray, addresses: np.ndarray) -> None:
        """Read the pages at ``addresses`` (sorted), as page numbers ``pages``."""
        if not len(pages):
            return
        out = np.empty((len(pages), self.page_size), dtype=np.uint8)
        self._read(pid, _address_runs(addresses, self.page_size), out)
        self._numbers.append(pages)
        self._data.append(out)

    def _live_copy(self, pid: int, region: Region) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows of ``region`` in the live copy of its armed range, and the refused addresses in it; None if
        there is no live copy of it."""
        end = region.start + region.npages * self.page_size
        for live in self._live.get(pid, ()):
            if live.start <= region.start and end <= live.end:
                first = (region.start - live.start) // self.page_size
                refused = live.refused[(live.refused >= region.start) & (live.refused < end)]
                return live.pages[first:first + region.npages], refused
        return None

    def _patch(self, pid: int, region: Region, pages: np.ndarray, refused: np.ndarray, written: np.ndarray) -> int:
        """A live-copied region completed in the pause: the pages written since it was armed (``written``: sorted
        addresses, of any region) and those the live read was refused are read again. Returns how many."""
        end = region.start + region.npages * self.page_size
        again = np.union1d(written[(written >= region.start) & (written < end)], refused)
        if len(again):
            runs = [(address, count, (address - region.start) // self.page_size)
                    for address, count, _ in _address_runs(again, self.page_size)]
            self._read(pid, runs, pages)
        self._numbers.append(np.arange(region.first_page, region.first_page + region.npages, dtype=np.uint64))
        self._data.append(pages)
        return len(again)

    def _read_whole(self, pid: int, region: Region, resident: np.ndarray) -> None:
        """Every page of a region: the resident rows read, the others zeros."""
        out = np.zeros((region.npages, self.page_size), dtype=np.uint8)
        self._read(pid, _row_runs(region.start, resident, self.page_size), out)
        self._numbers.append(np.arange(region.first_page, region.first_page + region.npages, dtype=np.uint64))
        self._data.append(out)


def _let_stop_settle(pid: int, timeout: float = 2.0) -> bool:
    """Whether the process is stopped (SIGSTOP: left stopped at the end, or by someone else), after letting a
    stop under way finish."""
    deadline = time.monotonic() + timeout
    while True:
        states = thread_states(pid)
        if set(states) <= set("TZX"):
            return "T" in states
        if not (sigstop_pending(pid) or "T" in states) or time.monotonic() > deadline:
            return False
        time.sleep(0.001)


def _row_runs(start: int, rows: np.ndarray, page_size: int) -> list[tuple[int, int, int]]:
    """Sorted page rows of a range starting at ``start`` -> (address, npages, row) runs of consecutive rows."""
    if not len(rows):
        return []
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
    counts = np.diff(np.concatenate([firsts, [len(rows)]]))
    return [(start + int(row) * page_size, int(count), int(row)) for row, count in zip(rows[firsts], counts)]


def _address_runs(addresses: np.ndarray, page_size: int) -> list[tuple[int, int, int]]:
    """Sorted page addresses -> (address, npages, first row) runs of consecutive pages."""
    if not len(addresses):
        return []
    breaks = np.flatnonzero(np.diff(addresses) != np.uint64(page_size)) + 1
    firsts = np.concatenate([[0], breaks])
    counts = np.diff(np.concatenate([firsts, [len(addresses)]]))
    return list(zip(addresses[firsts].tolist(), counts.tolist(), firsts.tolist()))
