"""How process-src finds changed pages in the kernel (mode=uffd): the written pages, not every page.

Each process of the set gets a userfaultfd injected on its first checkpoint
(remote_uffd.py); its private anonymous regions (heap, stacks, anonymous
mappings) are armed with async write-protect the first time they are seen
and sent whole then; at every later checkpoint, with the processes stopped,
PAGEMAP_SCAN lists the pages written (and dropped by MADV_DONTNEED) since the
last one, and only those are read. The pause follows the dirty pages, not
the size of the process. Pages are read during the pause (``copy=`` plays no
part for these regions) and handed over as they are.

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
from typing import Callable

import numpy as np

from pipeline.errors import TrackerError

from . import ptrace
from .digest_tracking import DigestTracking, Reader
from .injection_guard import Guardian, sigstop_pending

from .procmem import ProcessGone, thread_states
from .proclayout import Tracked
from .remote_uffd import KernelDirtyPages

UNTRACKED_SHARED = "shared memory: a write through another process's mapping is invisible to this one's page tables"
UNTRACKED_FILE = ("file-backed: a change of the file shows through the pages the process never wrote, unseen by "
                  "write-protection")


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

    # -- the interface process-src drives --------------------------------------------------------

    def forget(self, vanished: list[tuple[int, int]]) -> None:
        self.digest.forget(vanished)

    def forget_process(self, pid: int) -> None:
        """The process exited: its descriptor went with it; close ours."""
        kernel = self._kernel.pop(pid, None)
        if kernel is not None:
            kernel.abandon()
        self.digest.forget_process(pid)

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
        written = armed_pages = 0
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
                whole += [(item.region, kernel.uffd.resident_rows(item.region.start,
                                                                  item.region.npages * self.page_size))
                          for item in items if item.region.first_page not in sent
                          and item.region.first_page not in plan.digest]
            else:
                self._read_addresses(pid, plan.pages, plan.addresses)
                written += len(plan.pages)
            for region, resident in whole:
                self._read_whole(pid, region, resident)
            armed_pages += sum(item.region.npages for item in items if item.region.first_page not in plan.digest)
        self._warn_new()
        self.digest.paused(sorted(digested, key=lambda t: t.region.first_page), next_page, everything)
        self.counters.update(written_pages=written, armed_pages=armed_pages,
                             tracked_pages=self.counters.get("tracked_pages", 0) + armed_pages)

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

    def _read_whole(self, pid: int, region, resident: np.ndarray) -> None:
        """Every page of a region: the resident rows read, the others zeros."""
        out = np.zeros((region.npages, self.page_size), dtype=np.uint8)
        if len(resident):
            starts = region.start + resident.astype(np.uint64) * np.uint64(self.page_size)
            runs = _address_runs(starts, self.page_size)
            rows = resident[np.concatenate([[0], np.flatnonzero(np.diff(resident) != 1) + 1])]
            self._read(pid, [(address, count, int(row)) for (address, count, _), row in zip(runs, rows)], out)
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


def _address_runs(addresses: np.ndarray, page_size: int) -> list[tuple[int, int, int]]:
    """Sorted page addresses -> (address, npages, first row) runs of consecutive pages."""
    if not len(addresses):
        return []
    breaks = np.flatnonzero(np.diff(addresses) != np.uint64(page_size)) + 1
    firsts = np.concatenate([[0], breaks])
    counts = np.diff(np.concatenate([firsts, [len(addresses)]]))
    return list(zip(addresses[firsts].tolist(), counts.tolist(), firsts.tolist()))
