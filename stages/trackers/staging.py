"""The bounded staging buffer between a checkpoint's pause and the downstream stages.

A fixed set of pre-faulted slabs, each holding one batch worth of pages. A
checkpoint copies dirty pages into free slabs; the slab's batch is queued and
handed downstream by ``produce()``. A slab is reused only when no array
references it any more (downstream may still hold it, for example a
zero-copy ZeroMQ send), so staged data is never overwritten under a reader.
A slab held downstream for longer than ``GRACE`` seconds is replaced by a fresh
one: the bound is on what the tracker stages, not on what downstream keeps.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import numpy as np

from pipeline.errors import TrackerError


class StagingSlabs:
    """Slabs of ``rows`` pages totalling about ``total_bytes``; guarded by ``condition``."""

    GRACE = 0.005

    def __init__(self, total_bytes: int, batch_pages: int, page_size: int, condition: threading.Condition):
        self.rows = max(1, min(batch_pages, total_bytes // page_size))
        self.page_size = page_size
        count = max(1, total_bytes // (self.rows * page_size))
        self.condition = condition
        self._slabs = [self._fresh() for _ in range(count)]
        self._queued: set[int] = set()
        self._free_refcount = self._references(0)
        self.abandoned = False

    @property
    def count(self) -> int:
        return len(self._slabs)

    def _fresh(self) -> np.ndarray:
        slab = np.empty((self.rows, self.page_size), dtype=np.uint8)
        slab.fill(0)  # fault the pages in now, not during a pause
        return slab

    def _references(self, index: int) -> int:
        return sys.getrefcount(self._slabs[index])

    def take(self, before_waiting: Callable[[], None]) -> tuple[int, np.ndarray]:
        """A slab nothing references; waits for downstream to drain when every slab is staged.

        Call with ``condition`` held. ``before_waiting`` runs once before the
        first wait: the caller publishes what it staged so downstream can drain it.
        """
        held_since: float | None = None
        waiting = False
        while True:
            if self.abandoned:
                raise TrackerError("the stream was stopped while a checkpoint waited for staging space")
            for index in range(len(self._slabs)):
                if index not in self._queued and self._references(index) == self._free_refcount:
                    self._queued.add(index)
                    return index, self._slabs[index]
            if not waiting:
                before_waiting()
                waiting = True
            if len(self._queued) < len(self._slabs):
                held_since = held_since if held_since is not None else time.perf_counter()
                if time.perf_counter() - held_since >= self.GRACE:
                    index = next(i for i in range(len(self._slabs)) if i not in self._queued)
                    self._slabs[index] = self._fresh()
                    continue
                self.condition.wait(timeout=self.GRACE / 5)
            else:
                self.condition.wait()

    def abandon(self) -> None:
        """Nothing will drain the queue any more: fail waiting and future checkpoints."""
        self.abandoned = True
        self.condition.notify_all()

    def handed_downstream(self, index: int) -> None:
        """The batch in slab ``index`` left the queue; the slab frees when downstream drops it."""
        self._queued.discard(index)
        self.condition.notify_all()
