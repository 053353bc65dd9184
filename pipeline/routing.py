"""How batches move between the workers of linked stages: fan-out and fan-in.

Fan-out: control batches are broadcast to every downstream worker; page
batches go by the downstream stage's shard key (``page``: split by
``page_number % workers``) or round-robin as whole batches.

Fan-in: a downstream worker merges its upstream workers' streams. A control
batch is a barrier: once an input has delivered one, that input is held
(the process executor stops reading its socket) until every input has
delivered the matching marker; then one merged copy passes, with the
``pages`` counts of epoch ends summed. So no batch of epoch e+1 passes before
epoch e's end. Both executors use these same classes.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np

from .batch import DELTAS, ENCODED, PAGES, Batch, Flag
from .errors import CorruptData

PAGE_FORMATS = (PAGES, DELTAS, ENCODED)
"""Formats whose entries are pages; the runtime stamps their epoch ends with a page count."""

SHARDABLE_FORMATS = (PAGES, DELTAS)
"""Formats the runtime can split by page number."""

_PER_PAGE_ROWS = ("data", "reference")


def split_by_page(batch: Batch, workers: int) -> list[Batch | None]:
    """One batch per worker holding the pages ``page_number % workers`` assigns it (None if none)."""
    if workers == 1:
        return [batch]
    if batch.format not in SHARDABLE_FORMATS:
        raise CorruptData(f"page sharding: cannot split a {batch.format!r} batch (epoch {batch.epoch}) by page")
    owners = (batch.page_numbers % np.uint64(workers)).astype(np.intp)
    parts: list[Batch | None] = []
    for worker in range(workers):
        rows = np.flatnonzero(owners == worker)
        if rows.shape[0] == 0:
            parts.append(None)
        elif rows.shape[0] == batch.npages:
            parts.append(batch)
        else:
            changes = {"page_numbers": batch.page_numbers[rows], "kinds": batch.kinds[rows]}
            for name in _PER_PAGE_ROWS:
                array = getattr(batch, name)
                if array is not None:
                    changes[name] = array[rows]
            parts.append(batch.with_(**changes))
    return parts


class Router:
    """Decide which downstream workers get each batch of one link."""

    def __init__(self, workers: int, shard_key: str | None):
        self.workers = workers
        self.shard_key = shard_key
        self._next = 0

    def route(self, batch: Batch) -> Iterator[tuple[int, Batch]]:
        """(worker index, batch) pairs; control batches go to every worker."""
        if batch.is_control or self.workers == 1:
            for worker in range(self.workers):
                yield worker, batch
        elif self.shard_key == "page":
            for worker, part in enumerate(split_by_page(batch, self.workers)):
                if part is not None:
                    yield worker, part
        else:
            worker = self._next
            self._next = (worker + 1) % self.workers
            yield worker, batch


def _barrier_key(batch: Batch) -> tuple[int, int]:
    return int(batch.flags), int(batch.epoch)


def merge_markers(markers: list[Batch]) -> Batch:
    """One control batch standing for the same marker from every input; epoch-end page counts summed."""
    first = markers[0]
    keys = {_barrier_key(m) for m in markers}
    if len(keys) != 1:
        described = ", ".join(f"{Flag(f).name or f} epoch {e}" for f, e in sorted(keys))
        raise CorruptData(f"fan-in: workers delivered different control markers ({described})")
    if len(markers) == 1:
        return first
    streams = {str(m.meta["stream_id"]) for m in markers if "stream_id" in m.meta}
    if len(streams) > 1:    # lanes of one stream (several receiving workers) all carry its identity
        raise CorruptData(f"fan-in: workers delivered {Flag(first.flags).name or first.flags} markers of epoch "
                          f"{first.epoch} from different streams ({', '.join(sorted(streams))})")
    if not all("pages" in m.meta for m in markers):
        return first
    total = 0
    for marker in markers:
        try:
            total += int(marker.meta["pages"])
        except (TypeError, ValueError):
            raise CorruptData(f"fan-in: epoch {marker.epoch} end has a non-integer page count "
                              f"{marker.meta['pages']!r}") from None
    return first.with_(meta={**first.meta, "pages": total})


class FanIn:
    """Merge the streams of ``inputs`` upstream workers with control barriers.

    ``push`` returns the batches that may pass now. An input that delivered a
    control marker is ``blocked`` until all inputs have; the process executor
    does not read blocked inputs, so its held queue holds at most the rest of one message.
    """

    def __init__(self, inputs: int):
        self.inputs = inputs
        self._marker: list[Batch | None] = [None] * inputs
        self._held: list[deque[Batch]] = [deque() for _ in range(inputs)]

    def blocked(self, index: int) -> bool:
        return self._marker[index] is not None

    def push(self, index: int, batch: Batch) -> list[Batch]:
        released: list[Batch] = []
        self._accept(index, batch, released)
        return released

    def _accept(self, index: int, batch: Batch, released: list[Batch]) -> None:
        if self._marker[index] is not None:
            self._held[index].append(batch)
            return
        if not batch.is_control:
            released.append(batch)
            return
        self._marker[index] = batch
        if any(marker is None for marker in self._marker):
            return
        markers = [marker for marker in self._marker if marker is not None]  # all of them, by now
        self._marker = [None] * self.inputs
        released.append(merge_markers(markers))
        for held_index, held in enumerate(self._held):
            while held and self._marker[held_index] is None:
                self._accept(held_index, held.popleft(), released)


class EpochPageCounter:
    """Count the page entries a worker emits per epoch and stamp them on its epoch ends."""

    def __init__(self) -> None:
        self._pages: dict[int, int] = {}

    def stamp(self, batch: Batch) -> Batch:
        if batch.is_control:
            if batch.flags & Flag.EPOCH_END:
                return batch.with_(meta={**batch.meta, "pages": self._pages.pop(batch.epoch, 0)})
            return batch
        self._pages[batch.epoch] = self._pages.get(batch.epoch, 0) + batch.npages
        return batch
