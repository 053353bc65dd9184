"""xor-delta: the least-recently-used cache of last-sent page copies.

A NORMAL page found in the cache (hit) goes out as DELTA with its cached copy
as ``reference``; a miss goes out FULL and enters the cache, evicting the least
recently used copy; a RAW page drops its cache entry and goes out as-is; a ZERO
page goes out as a marker and its cached copy becomes zeros (a page not cached
yet enters the cache as zeros, so its next writes travel as small deltas).
Every cached copy is then exactly the receiver's copy (invariant 2).

Sharded by page number (``shard_key = "page"``; the runtime sends page p to
worker ``p % workers``): each worker owns ``1/workers`` of the cache and sees
every version of its pages in order. Counters: hits, misses, evictions,
bytes_in (page bytes received) and bytes_out (page bytes still to send).
Next to the built-in ``rle`` it fuses into ``XorDeltaRle``, which encodes hits
straight against the cache slots (one pass: XOR, run-length encode, cache
update); a built-in ``classify`` in front of it fuses in too (see
``Classify.fuse``). Fused, each element keeps its own counters and traffic, as
apart (pipeline.fusion).

Forgetting: a LAYOUT drops the copies of pages outside its regions or in its
``vanished`` ranges; the first batch (or marker) of a RESYNC epoch drops all.

The cache's copies live in one preallocated ``(slots, page_size)`` array so the
codec kernels can encode against them in place. Per batch, one kernel call
(``cython_kernels.page_cache.plan_lookup``) looks the pages up, marks them used
and gives their outgoing kinds (a fused plain ``classify`` finds the zero pages
in the same pass); allocation and eviction of the misses are a handful of numpy
operations, and batches with RAW pages (or page numbers past the dense map) are
planned in numpy. Never a Python loop per page (except in the sparse
page-number fallback of ``SlotIndex``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from cython_kernels import page_cache as _kernels
from pipeline.batch import (
    DEFAULT_PAGE_SIZE, DELTAS, ENCODED, KIND_DELTA, KIND_FULL, KIND_NORMAL, KIND_RAW, KIND_UNCHANGED, KIND_ZERO, PAGES,
    Batch, Flag,
)
from pipeline.errors import CorruptData
from pipeline.fusion import Fusion
from pipeline.stage import Property, Stage, StageContext
from stages.classify import Classify
from stages.common.checks import check_format_page_size, check_pages_batch, page_data
from stages.common.layout import in_ranges, layout_regions, page_ranges, vanished_ranges
from stages.codecs import PageCodec, get_page_codec
from stages.rle import RunLengthEncode

DENSE_PAGE_LIMIT = 1 << 24
"""Page numbers below this (64 GiB of 4 KiB pages) use a dense numpy map, 4 bytes per number; above it, a dict."""


class SlotIndex:
    """Map page number -> cache slot (-1 = not cached).

    Dense (a numpy array grown to the largest page number seen) while page
    numbers stay below DENSE_PAGE_LIMIT, as they do with a LAYOUT's dense page
    numbering; a dict once a larger page number appears.
    """

    def __init__(self) -> None:
        self._dense = np.full(0, -1, dtype=np.int32)
        self._sparse: dict[int, int] | None = None

    def lookup(self, page_numbers: np.ndarray) -> np.ndarray:
        """Slot of each page number as int64, -1 where not cached."""
        if self._sparse is not None:
            get = self._sparse.get
            return np.fromiter((get(p, -1) for p in page_numbers.tolist()), dtype=np.int64, count=page_numbers.shape[0])
        slots = np.full(page_numbers.shape[0], -1, dtype=np.int64)
        inside = page_numbers < self._dense.shape[0]
        slots[inside] = self._dense[page_numbers[inside].astype(np.intp)]
        return slots

    def assign(self, page_numbers: np.ndarray, slots: np.ndarray) -> None:
        if not page_numbers.shape[0]:
            return
        highest = int(page_numbers.max())
        if self._sparse is None and highest >= DENSE_PAGE_LIMIT:
            cached = np.flatnonzero(self._dense >= 0)
            self._sparse = dict(zip(cached.tolist(), self._dense[cached].tolist()))
            self._dense = np.full(0, -1, dtype=np.int32)
        if self._sparse is not None:
            self._sparse.update(zip(page_numbers.tolist(), slots.tolist()))
            return
        if highest >= self._dense.shape[0]:
            grown = np.full(max(highest + 1, 2 * self._dense.shape[0]), -1, dtype=np.int32)
            grown[: self._dense.shape[0]] = self._dense
            self._dense = grown
        self._dense[page_numbers.astype(np.intp)] = slots

    def remove(self, page_numbers: np.ndarray) -> None:
        if self._sparse is not None:
            for page in page_numbers.tolist():
                self._sparse.pop(page, None)
            return
        inside = page_numbers < self._dense.shape[0]
        self._dense[page_numbers[inside].astype(np.intp)] = -1

    def clear(self) -> None:
        self._dense = np.full(0, -1, dtype=np.int32)
        self._sparse = None

    @property
    def dense(self) -> np.ndarray | None:
        """The dense map (int32 slot by page number, -1 = not cached), or None once it went sparse."""
        return self._dense if self._sparse is None else None


class RepeatedPage(Exception):
    """A batch names a cached page twice (found by ``PageCache.look_up``)."""


class PageCache:
    """``slots`` page copies with least-recently-used replacement.

    ``pages[slot]`` is the copy of page ``page_of_slot[slot]`` last sent
    (-1 = free slot). ``begin_batch()`` advances the LRU clock; slots touched
    or allocated in the current batch are never evicted by it.
    """

    def __init__(self, slots: int, page_size: int):
        self.page_size = page_size
        self.pages = np.empty((slots, page_size), dtype=np.uint8)
        self.pages.fill(0)  # touch every page now, so the first checkpoint does not pay the page faults
        self.page_of_slot = np.full(slots, -1, dtype=np.int64)
        self._last_used = np.zeros(slots, dtype=np.uint64)
        self._index = SlotIndex()
        self._clock = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self.page_of_slot >= 0))

    def begin_batch(self) -> None:
        self._clock += 1

    def lookup(self, page_numbers: np.ndarray) -> np.ndarray:
        """Slot of each page (int64), -1 for pages not cached."""
        return self._index.lookup(page_numbers)

    def look_up(self, data: np.ndarray, page_numbers: np.ndarray, kinds_in: np.ndarray,
                find_zero: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """In one kernel pass: each page's slot (-1: not cached; cached ones touched) and outgoing kind (ZERO
        if it came ZERO or, ``find_zero``, is all zeros; else DELTA if cached, FULL if not).

        None when the kernel does not apply (a RAW page, or a sparse index): plan the general way.
        RepeatedPage if a cached page's number appears twice.
        """
        dense = self._index.dense
        if dense is None:
            return None
        kinds = np.empty(page_numbers.shape[0], dtype=np.uint8)
        slots = np.empty(page_numbers.shape[0], dtype=np.int64)
        found = _kernels.plan_lookup(data, page_numbers, kinds_in, dense, self._last_used, self._clock, find_zero,
                                     kinds, slots)
        if found == -2:
            raise RepeatedPage()
        return None if found == -1 else (kinds, slots)

    def touch(self, slots: np.ndarray) -> None:
        """Mark slots as used by the current batch."""
        self._last_used[slots] = self._clock

    def allocate(self, page_numbers: np.ndarray) -> tuple[np.ndarray, int]:
        """Slots for pages not cached yet, evicting least recently used ones.

        Returns (slots, evictions); a page gets -1 when every slot is taken by
        the current batch (a batch larger than the cache): it is sent whole and
        not cached.
        """
        wanted = page_numbers.shape[0]
        free = np.flatnonzero(self.page_of_slot < 0)[:wanted]
        evicted = np.empty(0, dtype=np.int64)
        shortfall = wanted - free.shape[0]
        if shortfall > 0:
            candidates = np.flatnonzero((self.page_of_slot >= 0) & (self._last_used < self._clock))
            if candidates.shape[0] > shortfall:
                oldest = np.argpartition(self._last_used[candidates], shortfall - 1)[:shortfall]
                candidates = candidates[oldest]
            evicted = candidates
            self._index.remove(self.page_of_slot[evicted].astype(np.uint64))
        granted = np.concatenate([free, evicted])
        slots = np.full(wanted, -1, dtype=np.int64)
        slots[: granted.shape[0]] = granted
        placed = page_numbers[: granted.shape[0]]
        self.page_of_slot[granted] = placed.astype(np.int64)
        self._last_used[granted] = self._clock
        self._index.assign(placed, granted)
        return slots, int(evicted.shape[0])

    def release(self, slots: np.ndarray) -> None:
        """Forget the pages held in ``slots``."""
        self._index.remove(self.page_of_slot[slots].astype(np.uint64))
        self.page_of_slot[slots] = -1
        self._last_used[slots] = 0

    def release_where(self, doomed: Callable[[np.ndarray], np.ndarray]) -> None:
        """Forget every cached page for which ``doomed(page_numbers)`` is True."""
        occupied = np.flatnonzero(self.page_of_slot >= 0)
        self.release(occupied[doomed(self.page_of_slot[occupied].astype(np.uint64))])

    def clear(self) -> None:
        self.page_of_slot[:] = -1
        self._last_used[:] = 0
        self._index.clear()


_PLANNED_KIND = np.full((256, 2), 255, dtype=np.uint8)
"""Outgoing kind by (incoming kind, cached?): NORMAL pages become DELTA (cached) or FULL; ZERO and RAW stay."""
_PLANNED_KIND[KIND_NORMAL] = (KIND_FULL, KIND_DELTA)
_PLANNED_KIND[KIND_ZERO] = KIND_ZERO
_PLANNED_KIND[KIND_RAW] = KIND_RAW


@dataclass
class CachePlan:
    """What one batch does to the cache: per page its outgoing kind and cache slot (-1: not cached)."""

    kinds: np.ndarray
    slots: np.ndarray
    hits: int
    """Pages going out as DELTA."""
    whole: int
    """Pages going out whole (FULL, RAW)."""

    def rows(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kinds == kind)

    def cached_rows(self, kind: int) -> np.ndarray:
        return np.flatnonzero((self.kinds == kind) & (self.slots >= 0))


class XorDelta(Stage):
    factory_name = "xor-delta"
    description = "LRU cache of last-sent page copies: hits become deltas against the cached copy, misses go whole"
    input_caps = (PAGES,)
    output_caps = DELTAS
    shard_key = "page"

    cache = Property("size", "32MiB", "Cache size in bytes, shared among the workers (each owns a slice)", minimum=1)
    cache_pages = Property("int", 0, "Cache size in pages (overrides cache when > 0)", minimum=0)
    classify = Property("object", None, "Set by fusing classify ! xor-delta: classify's properties, run first",
                        internal=True)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._cache: PageCache | None = None
        self._resync_epoch: int | None = None
        self._classifier = None if self.classify is None else Classify(**self.classify)
        if self._classifier is not None:  # fused: classify keeps its own counters and traffic
            self.fusion = Fusion([self._classifier, self])
            self._classified = self.fusion.link_after(self._classifier)
        self.counters.update(hits=0, misses=0, evictions=0, bytes_in=0, bytes_out=0)

    def fuse(self, downstream: Stage) -> Stage | None:
        """The built-in rle encoding straight against the cache (``XorDeltaRle``); exact built-in classes only."""
        if type(self) is XorDelta and type(downstream) is RunLengthEncode:
            return XorDeltaRle(**self.property_values(), rle=downstream.property_values())
        return None

    def start(self, context: StageContext) -> None:
        """Allocate this worker's cache slice (for the default page size; resized if the stream differs)."""
        super().start(context)
        self._cache = PageCache(self.cache_slots(DEFAULT_PAGE_SIZE), DEFAULT_PAGE_SIZE)
        self._resync_epoch = None
        if self._classifier is not None:
            self._classifier.start(context)

    @property
    def cached_pages(self) -> int:
        """How many page copies the cache holds."""
        return 0 if self._cache is None else len(self._cache)

    def cache_slots(self, page_size: int) -> int:
        """Slots of this worker's slice of the cache."""
        total = self.cache_pages or self.cache // page_size
        return max(1, total // self.context.worker_count)

    # ---- control ---------------------------------------------------------
    def control(self, batch: Batch) -> Iterable[Batch]:
        if self._classifier is not None:
            (batch,) = self._classifier.control(batch)
            self._classified.count(batch)
        self._apply_resync(batch)
        if batch.flags & Flag.LAYOUT:
            self._apply_layout(batch)
        yield batch

    def _apply_resync(self, batch: Batch) -> None:
        """Drop every copy when a RESYNC epoch starts (all its batches carry the flag, so clear only at the first)."""
        if not batch.flags & Flag.RESYNC:
            self._resync_epoch = None
        elif self._resync_epoch != batch.epoch:
            self._resync_epoch = batch.epoch
            if self._cache is not None:
                self._cache.clear()

    def _apply_layout(self, batch: Batch) -> None:
        """Drop the copies of pages outside the new layout or listed in its ``vanished`` ranges."""
        inside = page_ranges(layout_regions(batch, self.factory_name))
        vanished = vanished_ranges(batch, self.factory_name)
        if self._cache is not None:
            self._cache.release_where(lambda pages: ~in_ranges(pages, inside) | in_ranges(pages, vanished))

    # ---- data --------------------------------------------------------------
    def process(self, batch: Batch) -> Iterable[Batch]:
        classifier = self._classifier
        check_pages_batch(batch, self.factory_name if classifier is None else classifier.factory_name)
        find_zero = classifier is not None and classifier.zero_pages_only  # then the lookup kernel classifies
        if classifier is not None and not find_zero:
            batch = batch.with_(kinds=classifier.classified_kinds(batch))
        self._apply_resync(batch)
        plan = self._plan(batch, find_zero)
        if classifier is not None:
            self._classified.count(batch)  # the classified batch: same arrays' sizes as this one
        yield self._emit(batch, plan)

    def _emit(self, batch: Batch, plan: CachePlan) -> Batch:
        """DELTAS: ``reference`` rows of DELTA pages hold the copies before this batch; then the cache is updated."""
        cache = self._cache_for(batch)
        data = page_data(batch, self.factory_name)
        hits = plan.rows(KIND_DELTA)
        reference = np.zeros_like(data)  # rows of other pages travel as zeros, never as stale memory
        reference[hits] = cache.pages[plan.slots[hits]]
        stored = np.flatnonzero(((plan.kinds == KIND_FULL) | (plan.kinds == KIND_DELTA)) & (plan.slots >= 0))
        cache.pages[plan.slots[stored]] = data[stored]
        cache.pages[plan.slots[plan.cached_rows(KIND_ZERO)]] = 0
        sent = np.count_nonzero(plan.kinds != KIND_ZERO)
        self.counters["bytes_out"] += int(sent) * batch.page_size
        return batch.with_(format=DELTAS, kinds=plan.kinds, reference=reference)

    def _plan(self, batch: Batch, find_zero: bool) -> CachePlan:
        """Look every page up (``find_zero``: also classify it, for a fused plain classify), apply LRU, RAW drops
        and evictions; count hits, misses and evictions."""
        cache = self._cache_for(batch)
        pages = batch.page_numbers
        classifier = self._classifier if find_zero else None
        cache.begin_batch()
        try:
            looked_up = cache.look_up(page_data(batch, self.factory_name), pages, batch.kinds, find_zero)
        except RepeatedPage:
            raise CorruptData(f"{self.factory_name}: batch of epoch {batch.epoch} repeats a page number") from None
        if looked_up is None:
            kinds_in = classifier.classified_kinds(batch) if classifier is not None else batch.kinds
            kinds, slots = self._look_up_general(cache, batch, kinds_in)
        else:
            kinds, slots = looked_up
        counts = np.bincount(kinds, minlength=KIND_DELTA + 1)
        if classifier is not None and looked_up is not None:
            classifier.count(zero=int(counts[KIND_ZERO]), raw=0, pages=batch.npages)
        needs_slot = np.flatnonzero((slots < 0) & (kinds != KIND_RAW))
        evictions = 0
        if needs_slot.shape[0]:
            wanted = pages[needs_slot]
            ordered = np.sort(wanted)
            if (ordered[1:] == ordered[:-1]).any():
                raise CorruptData(f"{self.factory_name}: batch of epoch {batch.epoch} repeats a page number")
            slots[needs_slot], evictions = cache.allocate(wanted)
        hits, misses = int(counts[KIND_DELTA]), int(counts[KIND_FULL])
        self.counters["hits"] += hits
        self.counters["misses"] += misses
        self.counters["evictions"] += evictions
        self.counters["bytes_in"] += batch.npages * batch.page_size
        return CachePlan(kinds=kinds, slots=slots, hits=hits, whole=misses + int(counts[KIND_RAW]))

    def _look_up_general(self, cache: PageCache, batch: Batch, kinds_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``PageCache.look_up`` in numpy, for batches with RAW pages (their copies dropped) or a sparse index."""
        pages = batch.page_numbers
        ordered = np.sort(pages)
        if (ordered[1:] == ordered[:-1]).any():
            raise CorruptData(f"{self.factory_name}: batch of epoch {batch.epoch} repeats a page number")
        slots = cache.lookup(pages)
        raw = kinds_in == KIND_RAW
        if raw.any():
            cache.release(slots[raw & (slots >= 0)])
            slots[raw] = -1
        found = slots >= 0
        cache.touch(slots[found])
        return _PLANNED_KIND[kinds_in, found.view(np.uint8)], slots

    def _cache_for(self, batch: Batch) -> PageCache:
        if self._cache is None or (self._cache.page_size != batch.page_size and not len(self._cache)):
            self._cache = PageCache(self.cache_slots(batch.page_size), batch.page_size)
        elif self._cache.page_size != batch.page_size:
            raise CorruptData(f"{self.factory_name}: batch of epoch {batch.epoch} has page size {batch.page_size}, "
                              f"the stream started with {self._cache.page_size}")
        return self._cache


class XorDeltaRle(XorDelta):
    """xor-delta fused with rle: one kernel call per batch encodes the hits straight against the cache slots,
    copies the whole pages into the payload and the cache, and orders the entries as ``rle`` does."""

    factory_name = "xor-delta+rle"
    description = "xor-delta and rle in one pass (the fused kernel): PAGES in, ENCODED out"
    output_caps = ENCODED

    rle = Property("object", None, "Set by fusing xor-delta ! rle: rle's properties", internal=True)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._rle = RunLengthEncode(**(self.rle or {}))  # keeps rle's counters as rle would
        self.fusion = Fusion.join(self, self._rle)
        self._deltas = self.fusion.link_after(self)
        self._codec: PageCodec = get_page_codec(self._rle.format)
        self._kernel_format = _kernels.FORMATS[self._codec.name]
        self._emit_zero = bool(self._codec.get_config().get("emit_zero", False))

    @property
    def format(self) -> str:
        """The run-length format (rle's ``format``)."""
        return self._rle.format

    def process(self, batch: Batch) -> Iterable[Batch]:
        check_format_page_size(self._codec, batch, self._rle.factory_name)
        yield from super().process(batch)

    def control(self, batch: Batch) -> Iterable[Batch]:
        for out in super().control(batch):
            self._deltas.count(out)
            yield out

    def _emit(self, batch: Batch, plan: CachePlan) -> Batch:
        cache = self._cache_for(batch)
        data = page_data(batch, self.factory_name)
        npages = batch.npages
        fmt = self._kernel_format
        capacity = _kernels.payload_capacity(fmt, plan.hits, plan.whole, cache.page_size)
        payload = np.empty(capacity, dtype=np.uint8)
        offsets = np.empty(npages + 1, dtype=np.uint64)
        kinds = np.empty(npages, dtype=np.uint8)
        order = np.empty(npages, dtype=np.int64)
        used = _kernels.encode_batch(fmt, data, plan.kinds, plan.slots, cache.pages, payload, offsets, kinds,
                                     order, self._emit_zero)
        if used < 0:
            raise RuntimeError(f"{self.factory_name}: encode kernel rejected its plan")  # prevented by _plan
        payload = payload[:used].copy() if used < capacity // 2 else payload[:used]
        self._deltas.count(batch, extra_bytes=data.nbytes)  # the DELTAS batch: these arrays + a reference
        self.counters["bytes_out"] += int(np.count_nonzero(plan.kinds != KIND_ZERO)) * batch.page_size
        rle = self._rle.counters
        rle["overflows"] += int(np.count_nonzero(kinds[:plan.hits] == KIND_FULL))
        rle["unchanged"] += int(np.count_nonzero(kinds[:plan.hits] == KIND_UNCHANGED))
        rle["bytes_in"] += int(np.count_nonzero(plan.kinds != KIND_ZERO)) * batch.page_size
        rle["bytes_out"] += used
        return batch.with_(format=ENCODED, page_numbers=batch.page_numbers[order], kinds=kinds, data=None,
                           reference=None, payload=payload, offsets=offsets,
                           meta={**batch.meta, "codec": self._codec.name, "raw_size": used})
