"""region-src: checkpoints of memory owned by the calling process.

The application calls ``checkpoint()`` at its pause points. The pause finds the
pages written since the previous checkpoint (userfaultfd write-protect +
PAGEMAP_SCAN, time proportional to the written pages; or, where the kernel
lacks those, by comparing page digests) and copies them into the bounded
staging buffer; ``produce()`` (a thread of the runtime) hands them downstream
while the application runs on: the Remus order pause, copy, resume, then
compress and send.
"""
from __future__ import annotations

import collections
import ctypes
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.batch import PAGES, Batch
from pipeline.errors import ConfigError, TrackerError
from pipeline.stage import Property, Stage, StageContext
from stages.common.pages import digest_pages
from stages.common.wire import new_stream_id

from .epochs import EpochRecords, EpochStream
from stages.common.layout import Region
from .staging import StagingSlabs
from .uffd import WriteTracker

PAGE_SIZE = mmap.PAGESIZE
_MS_ASYNC = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def tracked_array(shape: int | tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """A zero-filled array in its own page-aligned anonymous mapping (trackable in userfaultfd mode)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return np.frombuffer(page_mapping(count * dtype.itemsize), dtype=dtype, count=count).reshape(shape)


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)   # Linux 5.14


def page_mapping(nbytes: int, prefault: bool = False) -> mmap.mmap:
    """A zero-filled anonymous mapping of ``nbytes`` rounded up to whole pages (at least one).

    ``prefault``: about to be filled whole, so back it with transparent huge pages and fault it in one call
    (several times faster than 4 KiB faults one by one; userfaultfd write tracking still reports 4 KiB
    pages, since the kernel splits a huge page at its first tracked write). Best effort.
    """
    mapping = mmap.mmap(-1, max(PAGE_SIZE, -(-nbytes // PAGE_SIZE) * PAGE_SIZE))
    if prefault:
        for advice in (getattr(mmap, "MADV_HUGEPAGE", None), _MADV_POPULATE_WRITE):
            try:
                if advice is not None:
                    mapping.madvise(advice)
            except OSError:
                pass   # an older kernel, or no huge pages: ordinary faults then
    return mapping


@dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint staged: its epoch, page count and pause in seconds."""

    epoch: int
    pages: int
    pause: float


class TrackedBuffer:
    """One application buffer: its bytes as pages, its address and its page numbers."""

    def __init__(self, name: str, buffer: Any, first_page: int, where: str):
        try:
            view = memoryview(buffer)
        except TypeError:
            raise TrackerError(f"{where}: {name} is a {type(buffer).__name__}, not a buffer") from None
        if view.readonly:
            raise TrackerError(f"{where}: {name} is read-only; a tracker needs memory the program writes")
        if not view.c_contiguous:
            raise TrackerError(f"{where}: {name} is not contiguous")
        if view.nbytes == 0:
            raise TrackerError(f"{where}: {name} is empty")
        self.name = name
        typed = isinstance(buffer, np.ndarray) and buffer.dtype.fields is None and not buffer.dtype.hasobject
        self.dtype = buffer.dtype.str if typed else ""
        """The array's dtype and shape, carried in the layout so a replica gives the same array back."""
        self.shape = tuple(int(n) for n in buffer.shape) if typed else ()
        self.bytes = np.frombuffer(view.cast("B"), dtype=np.uint8)
        self.address = self.bytes.ctypes.data
        self.nbytes = self.bytes.size
        full_pages, self.tail = divmod(self.nbytes, PAGE_SIZE)
        self.pages = self.bytes[:full_pages * PAGE_SIZE].reshape(full_pages, PAGE_SIZE)
        self.npages = full_pages + (1 if self.tail else 0)
        self.first_page = first_page

    @property
    def aligned(self) -> bool:
        return self.address % PAGE_SIZE == 0 and self.tail == 0

    def region(self) -> Region:
        return Region(self.name, self.address, self.first_page, self.npages, self.dtype, self.shape)

    def check_mapped(self, where: str) -> None:
        """TrackerError if the memory was unmapped behind the tracker's back."""
        start = self.address - self.address % PAGE_SIZE
        if _libc.msync(start, self.address + self.nbytes - start, _MS_ASYNC) != 0:
            raise TrackerError(f"{where}: region {self.name!r} at {self.address:#x} is no longer mapped "
                               f"({os.strerror(ctypes.get_errno())}); it was freed while tracked")

    def copy_rows(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy pages ``rows`` (sorted, local) into ``out`` rows; a partial last page is zero padded."""
        full = len(rows) - (1 if self.tail and len(rows) and rows[-1] == len(self.pages) else 0)
        np.take(self.pages, rows[:full], axis=0, out=out[:full], mode="clip")
        if full < len(rows):
            out[full, :self.tail] = self.bytes[len(self.pages) * PAGE_SIZE:]
            out[full, self.tail:] = 0

    def digests(self) -> np.ndarray:
        """One digest per page (the partial last page zero padded)."""
        digests = digest_pages(self.pages)
        if not self.tail:
            return digests
        last = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
        self.copy_rows(np.array([len(self.pages)]), last)
        return np.concatenate([digests, digest_pages(last)])


class _Staged:
    __slots__ = ("epoch", "page_numbers", "data", "slab", "resync")

    def __init__(self, epoch: int, page_numbers: np.ndarray, data: np.ndarray, slab: int, resync: bool):
        self.epoch, self.page_numbers, self.data, self.slab, self.resync = epoch, page_numbers, data, slab, resync


@dataclass(frozen=True)
class _Layout:
    epoch: int
    regions: list[Region]


@dataclass(frozen=True)
class _EpochEnd:
    epoch: int
    pause: float
    when: float
    resync: bool


class _Closed:
    pass


class RegionSource(Stage):
    """Checkpoints of buffers owned by the calling process (numpy arrays, mmaps, bytearrays).

    Tracks writes with userfaultfd write-protect (asynchronous) + PAGEMAP_SCAN,
    or by page digests where that is unavailable (``tracking_mode`` says which).
    The application calls ``checkpoint()``; ``produce()`` emits what it staged.
    """

    factory_name = "region-src"
    description = "Dirty pages of the caller's own buffers, checkpointed by the application (userfaultfd or digests)"
    output_caps = PAGES
    runs_in_caller = True

    regions = Property("object", None, "Buffer, list of buffers, or {name: buffer} to track (Python API; see "
                       "tracked_array); the LAYOUT names them region0, region1, ... or by their keys")
    staging = Property("size", "64MiB", "Staging buffer for copied pages; a checkpoint that overflows it waits "
                       "for downstream to drain", minimum=PAGE_SIZE)
    batch_pages = Property("int", 256, "Pages per emitted batch", minimum=1, maximum=1 << 16)
    copy_threads = Property("int", 2, "Threads copying dirty pages during the pause (1 = this thread only)",
                            minimum=1, maximum=64)
    mode = Property("choice", "auto", "Write tracking: userfaultfd+PAGEMAP_SCAN, page digests, or the best available",
                    choices=("auto", "uffd", "digest"))
    max_unacked = Property("int", 0, "Epochs in flight (checkpointed, not acknowledged by the replica) before "
                           "checkpoint() waits; 0 = unbounded (needs an AckListener attached)", minimum=0)
    ack_timeout = Property("duration", "30s", "Longest checkpoint() wait for an acknowledgement "
                           "(max-unacked, wait=True); then TrackerError", minimum=0.001)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self.tracking_mode = ""
        """``uffd`` or ``digest`` once set up; ``fallback_reason`` says why auto chose digest."""
        self.fallback_reason = ""
        self._buffers: list[TrackedBuffer] = []
        self._tracker: WriteTracker | None = None
        self._copy_helpers: ThreadPoolExecutor | None = None
        self._digests: list[np.ndarray] = []
        self._checkpoint_lock = threading.Lock()
        self._condition = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._slabs: StagingSlabs | None = None
        self._stream: EpochStream | None = None
        self.stream_id = new_stream_id().hex()
        """This tracker's stream identity: frame writes it into the wire, acknowledgements must name it."""
        self._epoch = 0
        self._resync_requested = False
        self._failure: TrackerError | None = None
        self._closed = False
        self._acknowledged_epoch = 0
        self._records = EpochRecords(PAGE_SIZE)
        self._discarded_epoch = 0          # epochs up to here may be lost to a resync: no longer in flight
        self._reported_discarded: set[int] = set()   # epochs the receiver said it dropped: never acknowledged
        self._acknowledged = threading.Condition()

    # ---- setup ---------------------------------------------------------------
    @property
    def _where(self) -> str:
        return self.name or self.factory_name

    def _ensure_ready(self) -> None:
        with self._condition:
            if self._stream is not None:
                return
            buffers = self.regions
            if buffers is None:
                raise ConfigError(f"{self._where}: needs regions= (a buffer or list of buffers, Python API only)")
            if isinstance(buffers, dict):
                named = [(str(name), buffer) for name, buffer in buffers.items()]
            else:
                buffers = buffers if isinstance(buffers, (list, tuple)) else [buffers]
                named = [(f"region{index}", buffer) for index, buffer in enumerate(buffers)]
            tracked: list[TrackedBuffer] = []
            for name, buffer in named:
                first_page = tracked[-1].first_page + tracked[-1].npages if tracked else 0
                tracked.append(TrackedBuffer(name, buffer, first_page, self._where))
            self._buffers = tracked
            self.tracking_mode = self._choose_mode()
            self._slabs = StagingSlabs(self.staging, self.batch_pages, PAGE_SIZE, self._condition)
            if self.copy_threads > 1:
                self._copy_helpers = ThreadPoolExecutor(self.copy_threads - 1, thread_name_prefix="region-src-copy")
            self._stream = EpochStream(PAGE_SIZE, self.batch_pages, tracking=self.tracking_mode,
                                       stream_id=self.stream_id)

    def _choose_mode(self) -> str:
        if self.mode == "digest":
            return "digest"
        unaligned = [b.name for b in self._buffers if not b.aligned]
        try:
            if unaligned:
                raise TrackerError(f"{', '.join(unaligned)} not page aligned in address and length "
                                   f"(allocate with tracked_array)")
            self._tracker = WriteTracker()
            for buffer in self._buffers:
                self._tracker.register(buffer.address, buffer.nbytes)
            return "uffd"
        except TrackerError as exc:
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None
            if self.mode == "uffd":
                raise TrackerError(f"{self._where}: userfaultfd mode unavailable: {exc}") from None
            self.fallback_reason = str(exc)
            return "digest"

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._ensure_ready()
        if self.fallback_reason:
            context.warn(f"{self._where}: tracking by page digests (cost grows with the region): "
                         f"{self.fallback_reason}")

    # ---- the application's side ----------------------------------------------
    def checkpoint(self, wait: bool = False, timeout: float | None = None) -> CheckpointInfo:
        """Pause point: stage the pages written since the last checkpoint; returns once they are copied.

        ``wait=True`` then blocks until ``acknowledged(epoch)`` reports the
        replica applied this epoch (TrackerError after ``timeout`` seconds,
        default ack-timeout, or as soon as the receiver reports it discarded
        the epoch). With ``max-unacked=N`` it first waits while N
        epochs are in flight; a resync request releases that wait, since the
        receiver discards the epochs in flight.
        """
        self._ensure_ready()
        if self.max_unacked:
            self._wait_in_flight_below(self.max_unacked)
        with self._checkpoint_lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise TrackerError(f"{self._where}: checkpoint after close()")
            began = time.perf_counter()
            began_monotonic = time.monotonic()
            when = time.time()
            epoch = self._epoch + 1
            resync = self._resync_requested
            self._resync_requested = False
            try:
                pages, staged = self._stage(epoch, everything=resync or epoch == 1, resync=resync)
            except TrackerError as exc:
                failure = TrackerError(f"{self._where}: checkpoint of epoch {epoch} failed: {exc}")
                self._fail(failure, epoch)
                raise failure from None
            pause = time.perf_counter() - began
            with self._acknowledged:
                self._epoch = epoch
                if resync:      # the receiver discards every epoch before a resync epoch
                    self._discarded_epoch = epoch - 1
            self._publish(staged + [_EpochEnd(epoch, pause, when, resync)])
            self.counters.update(checkpoints=epoch, pause_ms=pause * 1e3,
                                 pause_ms_max=max(pause * 1e3, self.counters.get("pause_ms_max", 0.0)))
            self._records.checkpoint(self.context, epoch, began_monotonic, pause, pages, when, resync)
        if wait:
            self._wait_acknowledged(epoch, timeout)
        return CheckpointInfo(epoch, pages, pause)

    def request_resync(self) -> None:
        """The next checkpoint carries the layout and every tracked page, flagged RESYNC.

        The epochs in flight will never be acknowledged: they no longer count against max-unacked.
        """
        self._resync_requested = True
        self.context.event("resync", f"{self._where}: a resync was asked for: the next checkpoint carries every page")
        with self._acknowledged:
            self._discarded_epoch = self._epoch
            self._acknowledged.notify_all()

    def acknowledged(self, epoch: int) -> None:
        """Hook for the receiver side: the replica has applied ``epoch``; releases ``checkpoint(wait=True)``."""
        self._records.acknowledged(self.context, epoch)
        with self._acknowledged:
            self._acknowledged_epoch = max(self._acknowledged_epoch, epoch)
            self._reported_discarded = {e for e in self._reported_discarded if e > self._acknowledged_epoch}
            self._acknowledged.notify_all()

    def epoch_discarded(self, epoch: int) -> None:
        """Hook for the receiver side: the replica dropped ``epoch``; a ``checkpoint(wait=True)`` for it fails."""
        with self._acknowledged:
            self._reported_discarded.add(epoch)
            self._acknowledged.notify_all()

    def _wait_acknowledged(self, epoch: int, timeout: float | None) -> None:
        timeout = self.ack_timeout if timeout is None else timeout
        with self._acknowledged:
            if not self._acknowledged.wait_for(
                    lambda: self._acknowledged_epoch >= epoch or epoch in self._reported_discarded, timeout):
                raise TrackerError(f"{self._where}: epoch {epoch} not acknowledged within {timeout:g} s")
            if self._acknowledged_epoch < epoch:
                raise TrackerError(f"{self._where}: epoch {epoch} will never be acknowledged: the receiver "
                                   f"discarded it (its warning says why) and asked for a resync")

    def _wait_in_flight_below(self, limit: int) -> None:
        """Block while ``limit`` epochs are checkpointed but neither acknowledged nor discarded."""
        def in_flight() -> int:
            return self._epoch - max(self._acknowledged_epoch, self._discarded_epoch)
        with self._acknowledged:
            if not self._acknowledged.wait_for(lambda: in_flight() < limit or self._resync_requested,
                                               self.ack_timeout):
                raise TrackerError(f"{self._where}: {in_flight()} epochs unacknowledged (max-unacked={limit}) "
                                   f"for {self.ack_timeout:g} s; are the receiver and its ack channel running?")

    def close(self) -> None:
        """End the stream after the checkpoints already taken."""
        with self._checkpoint_lock:
            if not self._closed:
                self._closed = True
                self._publish([_Closed()])

    def abort(self, reason: str) -> None:
        """End the stream with a TrackerError after the epochs already complete (for drivers that fail)."""
        with self._checkpoint_lock:
            self._fail(TrackerError(f"{self._where}: {reason}"), self._epoch + 1)

    def _stage(self, epoch: int, everything: bool, resync: bool) -> tuple[int, list[object]]:
        """Find and copy the dirty pages of every buffer into staging slabs.

        Returns the page count and what is staged but not yet published:
        downstream is woken only after the pause, unless the staging buffer
        fills and must drain.
        """
        for buffer in self._buffers:
            buffer.check_mapped(self._where)
        dirty = self._dirty_rows()
        if everything:
            dirty = [np.arange(buffer.npages, dtype=np.int64) for buffer in self._buffers]
        staged: list[object] = []
        if everything:  # the first epoch, or a resync: a receiver starting over needs the layout too
            staged.append(_Layout(epoch, [buffer.region() for buffer in self._buffers]))

        copies: list[tuple[TrackedBuffer, np.ndarray, np.ndarray]] = []

        def publish_staged() -> None:
            self._copy(copies)
            copies.clear()
            self._publish(staged)
            staged.clear()

        slabs = self._live_slabs
        for buffer, rows in zip(self._buffers, dirty):
            for low in range(0, len(rows), slabs.rows):
                chunk = rows[low:low + slabs.rows]
                with self._condition:
                    slab_index, slab = slabs.take(publish_staged)
                data = slab[:len(chunk)]
                copies.append((buffer, chunk, data))
                staged.append(_Staged(epoch, (chunk + buffer.first_page).astype(np.uint64), data, slab_index, resync))
        self._copy(copies)
        return sum(len(rows) for rows in dirty), staged

    def _copy(self, copies: list[tuple[TrackedBuffer, np.ndarray, np.ndarray]]) -> None:
        """Copy staged chunks, split among this thread and the copy helpers.

        Scattered pages of a large region are cold in cache and one core alone
        does not saturate memory bandwidth: two threads halve the copy (and so
        most of the pause) on the 2-core development machine.
        """
        def copy_share(share: list[tuple[TrackedBuffer, np.ndarray, np.ndarray]]) -> None:
            for buffer, rows, out in share:
                buffer.copy_rows(rows, out)

        shares = [copies[index::self.copy_threads] for index in range(self.copy_threads)]
        helpers = self._copy_helpers  # made when copy-threads > 1, so only then are there other shares
        helped = [helpers.submit(copy_share, share) for share in shares[1:] if share] if helpers is not None else []
        for share in shares[:1] if helpers is not None else shares:
            copy_share(share)
        for copy in helped:
            copy.result()

    def _dirty_rows(self) -> list[np.ndarray]:
        """Per buffer, the sorted local page indices written since the last checkpoint (re-arming them)."""
        if self._tracker is not None:
            return [((self._tracker.collect(b.address, b.nbytes) - np.uint64(b.address)) // np.uint64(PAGE_SIZE))
                    .astype(np.int64) for b in self._buffers]
        digests = [buffer.digests() for buffer in self._buffers]
        if not self._digests:
            self._digests = digests
            return [np.arange(b.npages, dtype=np.int64) for b in self._buffers]
        rows = [np.flatnonzero(new != old).astype(np.int64) for new, old in zip(digests, self._digests)]
        self._digests = digests
        return rows

    def _publish(self, items: list[object]) -> None:
        """Queue items for produce() and wake it."""
        with self._condition:
            self._queue.extend(items)
            self._condition.notify_all()

    def _fail(self, failure: TrackerError, epoch: int) -> None:
        """Drop the failed epoch's staged pages (its end never comes), then end the stream with the error."""
        with self._condition:
            self._failure = failure
            self._queue = collections.deque(item for item in self._queue if getattr(item, "epoch", 0) != epoch)
            self._queue.append(failure)
            self._condition.notify_all()

    # ---- the runtime's side --------------------------------------------------
    def produce(self) -> Iterator[Batch | None]:
        """Emit staged checkpoints in order; waits for the next (yielding None every ``idle_every``); ends
        after close()."""
        self._ensure_ready()
        while True:
            with self._condition:
                item = None
                if self._condition.wait_for(lambda: bool(self._queue), self.idle_every or None):
                    item = self._queue.popleft()
                    if isinstance(item, _Staged):
                        self._live_slabs.handed_downstream(item.slab)
            if item is None:
                yield None      # waiting for a checkpoint: the executor's timers run meanwhile
                continue
            if isinstance(item, TrackerError):
                raise item
            if isinstance(item, _Closed):
                yield self._live_stream.end_of_stream(self._epoch)
                return
            yield self._emit(item)
            del item
            with self._condition:
                self._condition.notify_all()  # a slab may have been released downstream

    def _emit(self, item: _Staged | _Layout | _EpochEnd) -> Batch:
        stream = self._live_stream
        if isinstance(item, _Staged):
            return stream.batch(item.epoch, item.page_numbers, item.data, item.resync)
        if isinstance(item, _Layout):
            return stream.layout(item.epoch, item.regions)
        return stream.end(item.epoch, item.pause, item.when, item.resync)

    @property
    def _live_slabs(self) -> StagingSlabs:
        if self._slabs is None:
            raise TrackerError(f"{self._where}: not started")
        return self._slabs

    @property
    def _live_stream(self) -> EpochStream:
        if self._stream is None:
            raise TrackerError(f"{self._where}: not started")
        return self._stream

    def stop(self) -> None:
        """End the stream, disarm write tracking and let go of the application's buffers."""
        if self._slabs is not None:
            with self._condition:
                self._slabs.abandon()  # a checkpoint waiting for staging space fails now
        self.close()  # wakes a produce() still waiting for checkpoints
        with self._checkpoint_lock:
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None
            if self._copy_helpers is not None:
                self._copy_helpers.shutdown()
                self._copy_helpers = None
            self._closed = True
            self._buffers = []
            self._digests = []

