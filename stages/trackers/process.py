"""process-src: checkpoints of another live process.

Each checkpoint stops the process (SIGSTOP), re-reads its writable mappings
(following those that appear, grow, shrink or vanish), reads their pages with
process_vm_readv and resumes it (SIGCONT); pages whose digest changed since
the previous checkpoint are emitted. Anonymous pages never written (neither
present nor swapped, by PAGEMAP_SCAN) are not read: they are zeros.
``copy=all`` (default) only copies during the pause and compares after the
process runs again, the Remus order; ``copy=changed`` compares during the
pause to need 4 MiB instead of a copy of the process. The pause is stop to
resume. The process is resumed on every path, errors included, except after
the final checkpoint with ``stop-at-end=true``.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from pipeline.batch import PAGES, Batch
from pipeline.errors import ConfigError, TrackerError, TransportError
from pipeline.stage import Property, Stage, StageContext
from stages.common.acks import AckListener
from stages.common.pages import digest_pages

from .epochs import EpochRecords, EpochStream
from stages.common.layout import Region, remap
from .procmem import ProcessGone, permission_hint, read_pages, wait_stopped, writable_mappings
from .uffd import PagemapScanner

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CHUNK_PAGES = 1024  # read and digested at a time: 4 MiB, still in cache when digested


@dataclass
class _Snapshot:
    """One checkpoint: the layout (and whether it changed), chunks read but not yet compared
    (``pending``: page numbers and pages, None for all-zero), and the changed pages found, in parts."""

    regions: list[Region]
    vanished: list[tuple[int, int]]
    layout_changed: bool
    pending: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)
    page_numbers: list[np.ndarray] = field(default_factory=list)
    data: list[np.ndarray] = field(default_factory=list)
    pause: float = 0.0
    when: float = 0.0
    began: float = 0.0
    """time.monotonic() when the checkpoint began."""


def _runs(resident: np.ndarray | None, offset: int, count: int, start: int) -> list[tuple[int, int, int]]:
    """(address, npages, row) runs to read for rows offset..offset+count of a region; all of them if
    ``resident`` (sorted rows holding data) is None."""
    if resident is None:
        return [(start + offset * PAGE_SIZE, count, 0)]
    rows = resident[np.searchsorted(resident, offset):np.searchsorted(resident, offset + count)] - offset
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts = np.concatenate([rows[:1], rows[breaks]])
    lasts = np.concatenate([rows[breaks - 1], rows[-1:]])
    return [(start + (offset + int(first)) * PAGE_SIZE, int(last - first) + 1, int(first))
            for first, last in zip(firsts, lasts)]


class ProcessSource(Stage):
    """Checkpoints of another process by page digest, stopping it for each (SIGSTOP .. SIGCONT)."""

    factory_name = "process-src"
    description = "Dirty pages of another live process (stop, digest, copy, resume every interval)"
    output_caps = PAGES

    pid = Property("int", None, "Process to checkpoint", minimum=1, required=True)
    interval = Property("duration", "25ms", "Time between checkpoints", minimum=0)
    checkpoints = Property("int", 0, "Checkpoints to take, then end (0: until the process exits or close())",
                           minimum=0)
    stop_at_end = Property("bool", False, "Leave the process stopped after the final checkpoint")
    batch_pages = Property("int", 256, "Pages per emitted batch", minimum=1, maximum=1 << 16)
    stop_timeout = Property("duration", "2s", "How long to wait for the process to stop", minimum=0)
    copy = Property("choice", "all", "all: the pause copies every resident page, changes are found after the "
                    "process resumes (shortest pause; memory as large as the process) | changed: the pause "
                    "digests chunk by chunk and copies only changed pages (4 MiB of memory)",
                    choices=("all", "changed"))
    ack_endpoint = Property("endpoint", "", "Bind an ack listener here (e.g. tcp://*:5556) for the receiver's "
                            "replica-sink ack-endpoint=: its resync requests reach this tracker ('' = none)")

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._regions: list[Region] = []
        self._next_page = 0
        self._digests = np.zeros(0, dtype=np.uint64)
        self._known = np.zeros(0, dtype=bool)
        self._chunk = np.zeros((CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8)
        self._copy = np.zeros((0, PAGE_SIZE), dtype=np.uint8)  # copy=all: every page of the last checkpoint
        self._zero_digest = digest_pages(np.zeros((1, PAGE_SIZE), dtype=np.uint8))[0]
        self._scanner: PagemapScanner | None = None
        self._resync_requested = False
        self._close_requested = threading.Event()
        self._ack_listener: AckListener | None = None
        self._records = EpochRecords(PAGE_SIZE)

    @property
    def _where(self) -> str:
        return self.name or self.factory_name

    def start(self, context: StageContext) -> None:
        """Check that the process exists and its memory can be read; TrackerError saying why not."""
        super().start(context)
        if self.pid is None:
            raise ConfigError(f"{self._where}: needs pid=")
        if not os.path.exists(f"/proc/{self.pid}"):
            raise TrackerError(f"{self._where}: no process with pid {self.pid}")
        try:
            mappings = writable_mappings(self.pid)
            if not mappings:
                raise TrackerError(f"pid {self.pid} has no writable memory to track (a kernel thread?)")
            read_pages(self.pid, [(mappings[0].start, 1, 0)], PAGE_SIZE, np.zeros((1, PAGE_SIZE), dtype=np.uint8))
            self._scanner = self._open_scanner(mappings[0].start)
        except ProcessGone:
            raise TrackerError(f"{self._where}: pid {self.pid} exited before tracking began") from None
        except TrackerError as exc:
            raise TrackerError(f"{self._where}: {exc}") from None
        if self.ack_endpoint:
            try:
                self._ack_listener = AckListener(self.ack_endpoint).attach(self)
            except TransportError as exc:
                self.stop()
                raise TransportError(f"{self._where}: {exc}") from None

    def _open_scanner(self, address: int) -> PagemapScanner | None:
        """PAGEMAP_SCAN on the process, to skip never-written anonymous pages; None where the kernel lacks it."""
        try:
            scanner = PagemapScanner(self.pid)
            scanner.resident(address, PAGE_SIZE)
            return scanner
        except TrackerError as exc:
            self.context.warn(f"{self._where}: reading every page, resident or not: {exc}")
            return None

    def stop(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None
        if self._ack_listener is not None:
            self._ack_listener.close()
            self._ack_listener = None

    def request_resync(self) -> None:
        """The next checkpoint carries the layout and every tracked page, flagged RESYNC."""
        self._resync_requested = True

    def acknowledged(self, epoch: int) -> None:
        """The receiver committed ``epoch`` (ack listener thread): records its checkpoint -> ack latency."""
        self._records.acknowledged(self.context, epoch)

    def close(self) -> None:
        """Take one final checkpoint now and end the stream (thread safe)."""
        self._close_requested.set()

    def produce(self) -> Iterator[Batch]:
        stream = EpochStream(PAGE_SIZE, self.batch_pages, tracking="digest", pid=self.pid)
        epoch = 0
        next_checkpoint = time.monotonic()
        while True:
            final = self._close_requested.is_set() or (self.checkpoints and epoch + 1 == self.checkpoints)
            resync = self._resync_requested
            self._resync_requested = False
            try:
                snapshot = self._checkpoint(epoch + 1, bool(final), everything=resync or epoch == 0)
            except ProcessGone:
                yield stream.end_of_stream(epoch)
                return
            epoch += 1
            if snapshot.layout_changed:
                yield stream.layout(epoch, snapshot.regions, snapshot.vanished)
            if snapshot.page_numbers:  # joined after the process resumed
                yield from stream.pages(epoch, np.concatenate(snapshot.page_numbers).astype(np.uint64),
                                        np.concatenate(snapshot.data), resync)
            yield stream.end(epoch, snapshot.pause, snapshot.when, resync)
            self._records.checkpoint(self.context, epoch, snapshot.began, snapshot.pause,
                                     sum(len(numbers) for numbers in snapshot.page_numbers), snapshot.when, resync)
            if self._ack_listener is not None:
                self.counters["acknowledged_epoch"] = self._ack_listener.acked_epoch
            self.counters.update(checkpoints=epoch, pause_ms=snapshot.pause * 1e3,
                                 pause_ms_max=max(snapshot.pause * 1e3, self.counters.get("pause_ms_max", 0.0)))
            if final:
                yield stream.end_of_stream(epoch)
                return
            next_checkpoint = max(next_checkpoint + self.interval, time.monotonic())
            self._close_requested.wait(max(0.0, next_checkpoint - time.monotonic()))

    def _checkpoint(self, epoch: int, final: bool, everything: bool) -> _Snapshot:
        """Stop, read, compare, copy, resume. ProcessGone if the process exited before it could be stopped."""
        began = time.perf_counter()
        began_monotonic = time.monotonic()
        when = time.time()
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise ProcessGone(self.pid) from None
        except PermissionError:
            raise TrackerError(f"{self._where}: cannot stop pid {self.pid}: permission denied; "
                               f"{permission_hint(self.pid)}") from None
        keep_stopped = False
        try:
            wait_stopped(self.pid, self.stop_timeout)
            try:
                snapshot = self._read(epoch, everything)
            except ProcessGone:
                raise TrackerError(f"pid {self.pid} died during the checkpoint of epoch {epoch}") from None
            keep_stopped = final and self.stop_at_end
        except TrackerError as exc:
            raise TrackerError(f"{self._where}: checkpoint of epoch {epoch} failed: {exc}") from None
        finally:
            if not keep_stopped:
                self._resume()
        snapshot.pause = time.perf_counter() - began
        snapshot.when = when
        snapshot.began = began_monotonic
        for numbers, pages in snapshot.pending:  # copy=all: compare now the process runs again
            self._keep_changes(snapshot, numbers, pages, everything)
        return snapshot

    def _resume(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def _read(self, epoch: int, everything: bool) -> _Snapshot:
        """With the process stopped: follow its mappings and read their resident pages, chunk by chunk.

        copy=changed compares each chunk while it is in cache and keeps only its
        changed pages; copy=all reads into a copy of the whole process and
        leaves the comparing for after the process resumed.
        """
        regions, vanished, self._next_page = remap(self._regions, writable_mappings(self.pid), PAGE_SIZE,
                                                   self._next_page)
        snapshot = _Snapshot(regions, vanished, everything or regions != self._regions or bool(vanished))
        self._regions = regions
        self._grow_digest_table()
        for first, count in vanished:
            self._known[first:first + count] = False
        total = sum(region.npages for region in regions)
        if self.copy == "all" and len(self._copy) < total:
            self._copy = np.zeros((total, PAGE_SIZE), dtype=np.uint8)
        row = unreadable = read = 0
        copy_runs: list[tuple[int, int, int]] = []  # copy=all: read in one go, up to 1024 runs a call
        for region in regions:
            resident = self._resident_rows(region)
            for offset in range(0, region.npages, CHUNK_PAGES):
                count = min(CHUNK_PAGES, region.npages - offset)
                numbers = np.arange(region.first_page + offset, region.first_page + offset + count, dtype=np.int64)
                runs = _runs(resident, offset, count, region.start)
                pages = None  # nothing resident: all zeros, nothing to read
                if runs:
                    pages = self._copy[row:row + count] if self.copy == "all" else self._chunk[:count]
                    if sum(run[1] for run in runs) < count:
                        pages[:] = 0  # the pages never written read as zeros
                    read += sum(run[1] for run in runs)
                if self.copy == "all":
                    copy_runs.extend((address, npages, row + first) for address, npages, first in runs)
                    snapshot.pending.append((numbers, pages))
                else:
                    if pages is not None:
                        unreadable += read_pages(self.pid, runs, PAGE_SIZE, pages)
                    self._keep_changes(snapshot, numbers, pages, everything)
                row += count
        if copy_runs:
            unreadable += read_pages(self.pid, copy_runs, PAGE_SIZE, self._copy)
        self.counters.update(unreadable_pages=unreadable, read_pages=read, tracked_pages=total)
        return snapshot

    def _keep_changes(self, snapshot: _Snapshot, numbers: np.ndarray, pages: np.ndarray | None,
                      everything: bool) -> None:
        """Compare pages (None: all zero) with the last checkpoint's digests; add the changed ones, copied."""
        digests = digest_pages(pages) if pages is not None else np.full(len(numbers), self._zero_digest)
        if everything:
            changed = np.arange(len(numbers))
        else:
            changed = np.flatnonzero(~self._known[numbers] | (self._digests[numbers] != digests))
        self._digests[numbers] = digests
        self._known[numbers] = True
        if len(changed):
            snapshot.page_numbers.append(numbers[changed])
            snapshot.data.append(np.take(pages, changed, axis=0) if pages is not None
                                 else np.zeros((len(changed), PAGE_SIZE), dtype=np.uint8))

    def _resident_rows(self, region: Region) -> np.ndarray | None:
        """Sorted rows of an anonymous region that hold data; None (read everything) for file mappings,
        whose absent pages are file contents, not zeros."""
        if self._scanner is None or not region.name.startswith("["):
            return None
        addresses = self._scanner.resident(region.start, region.npages * PAGE_SIZE)
        return ((addresses - np.uint64(region.start)) // np.uint64(PAGE_SIZE)).astype(np.int64)

    def _grow_digest_table(self) -> None:
        if len(self._digests) < self._next_page:
            grown = max(self._next_page, 2 * len(self._digests))
            self._digests = np.resize(self._digests, grown)
            self._known = np.concatenate([self._known, np.zeros(grown - len(self._known), dtype=bool)])
