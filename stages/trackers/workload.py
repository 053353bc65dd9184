"""workload-src: built-in programs dirtying their own memory, checkpointed by the region tracker.

Each workload runs over one uint8 array and models a dirtying pattern:

- ``kv``: a key-value store with Zipf-skewed key popularity and small value
  updates. Few pages change per checkpoint, the hot ones again and again,
  each by a few dozen bytes: XOR deltas are almost all zeros.
- ``sim``: a dense numerical simulation (heat diffusion on a float64 grid),
  relaxed band by band; a checkpoint interval rewrites most pages, changing
  the low-order bytes of most values.
- ``log``: an append-only log; records land at a moving tail (wrapping when
  the memory is full), so each checkpoint dirties a short contiguous run of
  pages, each written once, plus the header page holding the tail.

``make_workload(kind, memory, seed)`` gives the workload object itself, for
programs that drive one next to their own region-src (the demo does).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Protocol

import numpy as np

from pipeline.batch import PAGES, Batch
from pipeline.errors import ConfigError, TrackerError
from pipeline.stage import Property, Stage, StageContext

from .region import PAGE_SIZE, RegionSource, tracked_array


class Workload(Protocol):
    memory: np.ndarray

    def step(self) -> None:
        """One small unit of work (microseconds to a millisecond)."""


class KeyValueStore:
    """kv: 64-byte slots hashed over the memory; each step updates 64 keys drawn Zipf(1.2),
    writing a 16-byte value and bumping an 8-byte counter. Hot keys dominate, so a checkpoint
    finds few dirty pages, mostly the same ones, each changed in a few dozen bytes."""

    SLOT = 64
    UPDATES_PER_STEP = 64
    ZIPF_EXPONENT = 1.2

    def __init__(self, memory: np.ndarray, seed: int = 0):
        self.memory = memory
        self.rng = np.random.default_rng(seed)
        slots = memory.size // self.SLOT
        if slots == 0:
            raise ConfigError(f"kv workload: {memory.size} bytes is less than one {self.SLOT}-byte slot")
        self.table = memory[:slots * self.SLOT].reshape(slots, self.SLOT)
        self.counters = self.table.view(np.uint64)[:, 0]
        self.placement = self.rng.permutation(slots)  # key -> slot, as a hash table would spread them
        self.table[:, 8:] = self.rng.integers(0, 256, (slots, self.SLOT - 8), dtype=np.uint8)

    def step(self) -> None:
        keys = (self.rng.zipf(self.ZIPF_EXPONENT, self.UPDATES_PER_STEP) - 1) % len(self.placement)
        slots = self.placement[keys]
        self.table[slots, 16:32] = self.rng.integers(0, 256, (len(slots), 16), dtype=np.uint8)
        np.add.at(self.counters, slots, 1)


class DenseSimulation:
    """sim: heat diffusion on a float64 grid of one page per row; each step relaxes a band of
    1/8 of the rows (explicit stencil), so a few steps per checkpoint rewrite most pages, with
    changes in the low-order bytes of most values."""

    BANDS = 8

    def __init__(self, memory: np.ndarray, seed: int = 0):
        self.memory = memory
        columns = PAGE_SIZE // 8
        rows = memory.size // PAGE_SIZE
        if rows < 3:
            raise ConfigError(f"sim workload: needs at least 3 pages, got {memory.size} bytes")
        self.grid = memory[:rows * PAGE_SIZE].view(np.float64).reshape(rows, columns)
        self.grid[:] = np.random.default_rng(seed).random((rows, columns))
        self.band = 0

    def step(self) -> None:
        rows = self.grid.shape[0]
        size = max(1, (rows - 2) // self.BANDS)
        low = 1 + (self.band * size) % (rows - 2)
        high = min(rows - 1, low + size)
        self.band += 1
        g = self.grid
        laplacian = g[low - 1:high - 1, 1:-1] + g[low + 1:high + 1, 1:-1] + g[low:high, :-2] + g[low:high, 2:]
        g[low:high, 1:-1] += 0.1 * (laplacian - 4.0 * g[low:high, 1:-1])


class AppendLog:
    """log: 64 records of 32-256 bytes (an 8-byte sequence number, then payload) appended per
    step at the tail; page 0 holds the tail offset and record count; the log wraps to page 1
    when full. A checkpoint dirties the header page and a contiguous run at the tail."""

    RECORDS_PER_STEP = 64

    def __init__(self, memory: np.ndarray, seed: int = 0):
        self.memory = memory
        if memory.size < 2 * PAGE_SIZE:
            raise ConfigError(f"log workload: needs at least 2 pages, got {memory.size} bytes")
        self.rng = np.random.default_rng(seed)
        self.header = memory[:16].view(np.uint64)
        self.body = memory[PAGE_SIZE:memory.size - memory.size % PAGE_SIZE]
        self.header[:] = 0

    def step(self) -> None:
        lengths = self.rng.integers(32, 257, self.RECORDS_PER_STEP)
        blob = self.rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths
        sequence = self.header[1] + np.arange(1, self.RECORDS_PER_STEP + 1, dtype=np.uint64)
        for offset in range(8):  # little-endian sequence number at the start of each record
            blob[starts + offset] = ((sequence >> np.uint64(8 * offset)) & np.uint64(0xFF)).astype(np.uint8)
        tail = int(self.header[0])
        if tail + blob.size > self.body.size:
            tail = 0
        self.body[tail:tail + blob.size] = blob[:self.body.size]
        self.header[0] = tail + min(blob.size, self.body.size)
        self.header[1] += self.RECORDS_PER_STEP


WORKLOADS: dict[str, type] = {"kv": KeyValueStore, "sim": DenseSimulation, "log": AppendLog}


def make_workload(kind: str, memory: np.ndarray, seed: int = 0) -> Workload:
    """The workload ``kind`` (kv, sim, log) running over the bytes of the contiguous array ``memory``."""
    if kind not in WORKLOADS:
        raise ConfigError(f"unknown workload {kind!r}; known: {', '.join(WORKLOADS)}")
    if not memory.flags.c_contiguous or not memory.flags.writeable:
        raise ConfigError(f"{kind} workload: memory must be a writable, contiguous array")
    return WORKLOADS[kind](memory.reshape(-1).view(np.uint8), seed)


class WorkloadSource(Stage):
    """A built-in workload in this stage's own memory, checkpointed ``rate`` times a second by region-src.

    kv: Zipf-skewed small value updates (few pages, the same hot ones).
    sim: dense simulation rewriting most pages every checkpoint.
    log: append-only log dirtying a contiguous run at its tail.
    """

    factory_name = "workload-src"
    description = "Built-in workload (kv: Zipf small updates, sim: rewrites most pages, log: append-only tail)"
    output_caps = PAGES

    kind = Property("choice", "kv", "kv: Zipf-skewed small updates | sim: rewrites most pages | log: append-only",
                    choices=tuple(WORKLOADS))
    size = Property("size", "64MiB", "Tracked memory the workload runs in", minimum=2 * PAGE_SIZE)
    seconds = Property("duration", "2s", "How long the workload runs", minimum=0)
    rate = Property("float", 40, "Checkpoints per second", minimum=0.001)
    steps = Property("int", 16, "Workload steps between checkpoints", minimum=0)
    seed = Property("int", 0, "Random seed of the workload")
    staging = RegionSource.staging
    batch_pages = RegionSource.batch_pages
    mode = RegionSource.mode

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self.workload: Workload | None = None
        self.region: RegionSource | None = None
        self._driver: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, context: StageContext) -> None:
        super().start(context)
        memory = tracked_array(self.size)
        self.workload = make_workload(self.kind, memory, self.seed)
        self.region = RegionSource(regions=memory, staging=self.staging, batch_pages=self.batch_pages,
                                   mode=self.mode, name=self.name or self.factory_name)
        self.region.start(context)

    @property
    def _live_region(self) -> RegionSource:
        if self.region is None:
            raise TrackerError(f"{self.factory_name}: not started")
        return self.region

    def request_resync(self) -> None:
        """The next checkpoint carries the layout and every page, flagged RESYNC."""
        self._live_region.request_resync()

    def produce(self) -> Iterator[Batch | None]:
        """Run the workload in a thread that checkpoints it; emit the region tracker's stream."""
        self._driver = threading.Thread(target=self._drive, name=f"{self.factory_name} driver", daemon=True)
        self._driver.start()
        self._live_region.idle_every = self.idle_every
        try:
            yield from self._live_region.produce()
        finally:
            self.stop()
            self._driver.join()

    def _drive(self) -> None:
        """``steps`` steps, then a checkpoint, ``rate`` times a second until ``seconds`` have passed."""
        region = self._live_region
        workload = self.workload
        if workload is None:
            raise TrackerError(f"{self.factory_name}: not started")
        try:
            period = 1.0 / self.rate
            began = time.monotonic()
            next_checkpoint = began
            while not self._stop.is_set():
                for _ in range(self.steps):
                    workload.step()
                if self._stop.wait(max(0.0, next_checkpoint - time.monotonic())):
                    break
                region.checkpoint()
                if time.monotonic() - began >= self.seconds:
                    break
                next_checkpoint = max(next_checkpoint + period, time.monotonic())
            region.close()
        except TrackerError:
            pass  # the region tracker ends its stream with this error itself
        except Exception as exc:  # a workload bug: end the stream with it rather than hang
            region.abort(f"workload {self.kind} failed: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        if self.region is not None:
            self.region.stop()
