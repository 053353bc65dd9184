"""The output stream every tracker emits: layout, data batches, epoch ends, end of stream.

One ``EpochStream`` per tracker numbers the batches (``sequence`` runs across
the whole stream), splits an epoch's pages into batches of at most
``batch_pages`` and keeps the running count and digest that the epoch-end
marker carries.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.batch import PAGES, Batch, Flag
from pipeline.stage import StageContext
from stages.common.pages import combine_digests, digest_pages

from stages.common.layout import Region, layout_meta


class EpochStream:
    """Builds a tracker's batches in stream order."""

    def __init__(self, page_size: int, batch_pages: int, **layout_extra: Any):
        self.page_size = page_size
        self.batch_pages = batch_pages
        self.layout_extra = layout_extra
        self.sequence = 0
        self._page_numbers: list[np.ndarray] = []
        self._digests: list[np.ndarray] = []

    def _stamp(self, batch: Batch) -> Batch:
        batch.sequence = self.sequence
        self.sequence += 1
        return batch

    def layout(self, epoch: int, regions: Sequence[Region], vanished: Sequence[tuple[int, int]] = ()) -> Batch:
        """The LAYOUT marker announcing ``regions`` before ``epoch``'s pages."""
        return self._stamp(Batch.control(Flag.LAYOUT, epoch, page_size=self.page_size,
                                         **layout_meta(regions, vanished), **self.layout_extra))

    def pages(self, epoch: int, page_numbers: np.ndarray, data: np.ndarray, resync: bool) -> Iterator[Batch]:
        """Data batches for these pages (``data`` rows are owned copies), at most batch_pages each."""
        for low in range(0, len(page_numbers), self.batch_pages):
            yield self.batch(epoch, page_numbers[low:low + self.batch_pages], data[low:low + self.batch_pages], resync)

    def batch(self, epoch: int, page_numbers: np.ndarray, data: np.ndarray, resync: bool) -> Batch:
        """One data batch; its pages count towards the epoch's digest."""
        page_numbers = np.ascontiguousarray(page_numbers, dtype=np.uint64)
        self._page_numbers.append(page_numbers)
        self._digests.append(digest_pages(data))
        return self._stamp(Batch(format=PAGES, epoch=epoch, flags=Flag.RESYNC if resync else Flag.NONE,
                                 page_size=self.page_size, page_numbers=page_numbers,
                                 kinds=np.zeros(len(page_numbers), dtype=np.uint8), data=data))

    def end(self, epoch: int, pause: float, when: float | None = None, resync: bool = False) -> Batch:
        """The EPOCH_END marker: page count and order-independent digest of the epoch's pages."""
        empty = np.empty(0, dtype=np.uint64)
        page_numbers = np.concatenate([empty, *self._page_numbers])
        digest = int(combine_digests(page_numbers, np.concatenate([empty, *self._digests])))
        self._page_numbers.clear()
        self._digests.clear()
        flags = Flag.EPOCH_END | (Flag.RESYNC if resync else Flag.NONE)
        return self._stamp(Batch.control(flags, epoch, page_size=self.page_size, pages=len(page_numbers),
                                         digest=digest, pause_ms=pause * 1e3,
                                         time=time.time() if when is None else when))

    def end_of_stream(self, last_epoch: int) -> Batch:
        return self._stamp(Batch.control(Flag.END_OF_STREAM, last_epoch, page_size=self.page_size))


class EpochRecords:
    """A tracker's per-epoch statistics (pipeline.epoch_stats): what each checkpoint took, and, once
    the receiver acknowledges an epoch, checkpoint -> acknowledgement latency."""

    KEPT = 100_000
    """Checkpoint times kept for epochs not acknowledged yet (the oldest go first)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._began: dict[int, float] = {}
        self._lock = threading.Lock()

    def checkpoint(self, context: StageContext, epoch: int, began: float, pause: float, pages: int,
                   when: float, resync: bool) -> None:
        """Record one checkpoint (``began``: time.monotonic() when it started)."""
        context.record_epoch(epoch, pause_seconds=pause, dirty_pages=pages, dirty_bytes=pages * self.page_size,
                             time=when, resync=int(resync))
        with self._lock:
            self._began[epoch] = began
            if len(self._began) > self.KEPT:
                del self._began[next(iter(self._began))]

    def acknowledged(self, context: StageContext, epoch: int) -> None:
        """The receiver committed ``epoch``: record its latency (earlier epochs it covers are forgotten)."""
        now = time.monotonic()
        with self._lock:
            began = self._began.pop(epoch, None)
            for older in [e for e in self._began if e < epoch]:
                del self._began[older]
        if began is not None:
            context.record_epoch(epoch, ack_latency_seconds=now - began)
