"""Small stages the runtime tests drive: recorders, failures, slow consumers, fusable pairs.

They live in an importable module (not in a test file) so worker processes can rebuild them; ``@register``
makes them usable by name in the tests' launch strings.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import time
from typing import Iterable, Iterator

import numpy as np
import xxhash

from pipeline.batch import ANY, DELTAS, PAGES, Batch, Flag
from pipeline.fusion import Fusion
from pipeline.registry import register
from pipeline.stage import Property, Stage, StageContext
from stages.basic import Identity, TestSource


@register
class Recorder(Stage):
    """Sink writing a canonical account of its input to ``path`` (one JSON line per event) at the end.

    Data batches are recorded as (epoch, page, xxh3 of data) sorted per epoch,
    since order inside an epoch is free; control markers in arrival order.
    """

    factory_name = "recorder"
    description = "test sink: write what arrives to a JSON file"
    input_caps = (ANY,)
    output_caps = None
    path = Property("str", "", "where to write the record")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.events: list = []
        self.pages: list = []

    def process(self, batch: Batch) -> Iterable[Batch]:
        for row, page in enumerate(batch.page_numbers.tolist()):
            digest = xxhash.xxh3_64_hexdigest(batch.data[row]) if batch.data is not None else ""
            self.pages.append((batch.epoch, page, int(batch.kinds[row]), digest))
        self.events.append(["data", batch.epoch])
        return ()

    def control(self, batch: Batch) -> Iterable[Batch]:
        self.events.append([Flag(batch.flags).name, batch.epoch, batch.meta.get("pages")])
        if batch.flags & Flag.END_OF_STREAM:
            with open(self.path, "w") as file:
                json.dump({"events": self.events, "pages": sorted(self.pages)}, file)
        return ()


def read_record(path) -> dict:
    with open(path) as file:
        return json.load(file)


@register
class FailAt(Identity):
    """Pass batches through; raise (or kill its own process) at data batch number ``at``."""

    factory_name = "fail-at"
    at = Property("int", 0, "data batch number that fails")
    how = Property("choice", "raise", "how to fail", choices=("raise", "sigkill", "hang"))
    worker = Property("int", -1, "only this worker fails (-1: every worker)")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.seen = 0

    def process(self, batch: Batch) -> Iterable[Batch]:
        failing = self.worker in (-1, self.context.worker_index)
        if failing and self.seen == self.at:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "hang":
                while True:
                    time.sleep(0.05)
            raise RuntimeError(f"planned failure at batch {self.at}")
        self.seen += 1
        yield batch


@register
class ShardChecker(Identity):
    """Page-sharded pass-through that fails if it receives a page another worker owns."""

    factory_name = "shard-checker"
    shard_key = "page"
    input_caps = (PAGES, DELTAS)

    def process(self, batch: Batch) -> Iterable[Batch]:
        owners = batch.page_numbers % np.uint64(self.context.worker_count)
        if np.any(owners != self.context.worker_index):
            raise AssertionError(f"worker {self.context.worker_index} got pages of other workers")
        self.counters["pages"] = self.counters.get("pages", 0) + batch.npages
        yield batch


@register
class CountingSource(TestSource):
    """test-src that writes how many data batches it has handed to the runtime into ``counter-file``."""

    factory_name = "counting-src"
    counter_file = Property("str", "", "file holding one int64: data batches emitted so far")

    def produce(self) -> Iterator[Batch]:
        counter = np.memmap(self.counter_file, dtype=np.int64, mode="r+", shape=(1,))
        for batch in super().produce():
            yield batch
            if not batch.is_control:
                counter[0] += 1


@register
class BackToBackSource(TestSource):
    """test-src declaring back-to-back output: the process executor may hold a page batch for the next one."""

    factory_name = "back-to-back-src"
    back_to_back = True


@register
class LaggingSink(Stage):
    """Slow sink that records, per data batch, how far ahead the counting source is."""

    factory_name = "lagging-sink"
    input_caps = (ANY,)
    output_caps = None
    counter_file = Property("str", "", "the counting source's counter file")
    delay = Property("duration", "2ms", "time spent per batch")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.counter = np.memmap(self.counter_file, dtype=np.int64, mode="r", shape=(1,))
        self.counters["consumed"] = 0
        self.counters["max_ahead"] = 0

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.counters["consumed"] += 1
        ahead = int(self.counter[0]) - self.counters["consumed"]
        self.counters["max_ahead"] = max(self.counters["max_ahead"], ahead)
        time.sleep(self.delay)
        return ()


@register
class Doubler(Identity):
    """Pass-through counting its batches; a user's stage that opts in to fusing with a following identity."""

    factory_name = "doubler"

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.counters["passed"] = self.counters.get("passed", 0) + 1
        yield batch

    def fuse(self, downstream: Stage) -> Stage | None:
        return FusedPair(**self.property_values()) if type(downstream) is Identity else None


class FusedPair(Doubler):
    """doubler ! identity in one stage: counts the link between them, so both keep their statistics."""

    factory_name = "fused-pair"

    def __init__(self, **properties):
        super().__init__(**properties)
        self.fusion = Fusion([self, Identity()])

    def handle(self, batch: Batch) -> Iterator[Batch]:
        for out in super().handle(batch):
            self.fusion.links[0].count(out)
            yield out


class CallerSource(Stage):
    """A runs_in_caller source: the application pushes epochs with ``checkpoint(pages)``."""

    factory_name = "caller-src"
    output_caps = PAGES
    runs_in_caller = True

    def __init__(self, **properties):
        super().__init__(**properties)
        self.requests: queue.Queue = queue.Queue()
        self.pid_seen = 0

    def checkpoint(self, pages: int | None) -> None:
        """Queue one epoch of ``pages`` pages (None ends the stream)."""
        self.requests.put(pages)

    def produce(self) -> Iterator[Batch]:
        self.pid_seen = os.getpid()
        epoch = 0
        while (pages := self.requests.get(timeout=10)) is not None:
            numbers = np.arange(pages, dtype=np.uint64)
            yield Batch(format=PAGES, epoch=epoch, page_numbers=numbers, kinds=np.zeros(pages, np.uint8),
                        data=np.zeros((pages, 4096), np.uint8))
            yield Batch.control(Flag.EPOCH_END, epoch, pages=pages)
            epoch += 1
        yield Batch.control(Flag.END_OF_STREAM, epoch)


@register
class Warner(Identity):
    """Pass-through that posts one warning (with a numpy field) at its first batch and calls ``callback`` per batch."""

    factory_name = "warner"
    callback = Property("object", None, "called with every data batch (Python API only)")

    def process(self, batch: Batch) -> Iterable[Batch]:
        if not self.counters.get("warned"):
            self.counters["warned"] = np.int64(1)  # numpy values must survive the bus
            self.context.post("warning", message=f"first batch of epoch {batch.epoch}", pages=np.uint64(batch.npages))
        if self.callback is not None:
            self.callback(batch)
        yield batch


@register
class Hoarder(Recorder):
    """Recorder that keeps every input batch until the end of the stream, then digests them all."""

    factory_name = "hoarder"

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.kept: list[Batch] = []

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.kept.append(batch)
        return ()

    def control(self, batch: Batch) -> Iterable[Batch]:
        if batch.flags & Flag.END_OF_STREAM:
            for kept in self.kept:
                super().process(kept)
        return super().control(batch)


@register
class EpochNoter(Identity):
    """Pass-through recording per-epoch values at each epoch end: ``noted=1`` (adds up over workers) and
    ``wait_seconds`` = 0.001 x (worker index + 1) (takes the maximum)."""

    factory_name = "epoch-noter"

    def control(self, batch: Batch) -> Iterable[Batch]:
        if batch.flags & Flag.EPOCH_END:
            self.context.record_epoch(batch.epoch, noted=1, wait_seconds=0.001 * (self.context.worker_index + 1))
        yield batch


@register
class PausingSource(Stage):
    """Two one-batch epochs with ``pause`` seconds between them, waiting as region-src does (None every
    ``idle_every``)."""

    factory_name = "pausing-src"
    output_caps = PAGES
    pause = Property("duration", "500ms", "wait between the two epochs")

    def produce(self) -> Iterator[Batch | None]:
        for epoch in (0, 1):
            yield Batch(format=PAGES, epoch=epoch, page_numbers=np.arange(2, dtype=np.uint64),
                        kinds=np.zeros(2, np.uint8), data=np.zeros((2, 4096), np.uint8))
            yield Batch.control(Flag.EPOCH_END, epoch, pages=2)
            resume_at = time.monotonic() + (self.pause if epoch == 0 else 0)
            while time.monotonic() < resume_at:
                time.sleep(min(self.idle_every or 0.5, max(0.0, resume_at - time.monotonic())))
                yield None
        yield Batch.control(Flag.END_OF_STREAM, 1)


@register
class Ticker(Identity):
    """Pass-through with a timer: every ``interval`` it emits an empty data batch of the last epoch seen."""

    factory_name = "ticker"
    interval = Property("duration", "20ms", "tick interval")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.tick_interval = self.interval
        self.counters["ticks"] = 0
        self.epoch = 0

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.epoch = batch.epoch
        yield batch

    def tick(self) -> Iterable[Batch]:
        self.counters["ticks"] += 1
        yield Batch(format=PAGES, epoch=self.epoch, meta={"tick": self.counters["ticks"]})


@register
class Tamper(Identity):
    """Pass-through that changes each data batch and yields the same object: ``how=meta`` sets meta["shift"]
    in place, ``how=pages`` reassigns its page numbers (+1)."""

    factory_name = "tamper"
    how = Property("choice", "meta", "what to change", choices=("meta", "pages"))

    def process(self, batch: Batch) -> Iterable[Batch]:
        if self.how == "meta":
            batch.meta["shift"] = 1
        else:
            batch.page_numbers = batch.page_numbers + np.uint64(1)
        yield batch


@register
class Shifter(Identity):
    """Adds meta["shift"] (0 without it) to the page numbers of each data batch."""

    factory_name = "shifter"

    def process(self, batch: Batch) -> Iterable[Batch]:
        yield batch.with_(page_numbers=batch.page_numbers + np.uint64(batch.meta.get("shift", 0)), meta={})


@register
class Holder(Identity):
    """Pass-through with a timer: holds data batches until its next tick, or until a marker comes (then they go
    first), so its output and its per-epoch accounts never depend on when the timer runs;
    ``counters["by_timer"]`` counts the batches a tick let go (a timing figure, not a result)."""

    factory_name = "holder"
    interval = Property("duration", "5ms", "tick interval")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.tick_interval = self.interval
        self.held: list[Batch] = []
        self.counters["by_timer"] = 0

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.held.append(batch)
        return ()

    def flush(self, marker: Batch) -> Iterable[Batch]:
        return self._release()

    def tick(self) -> Iterable[Batch]:
        self.counters["by_timer"] += len(self.held)
        return self._release()

    def _release(self) -> list[Batch]:
        released, self.held = self.held, []
        return released


@register
class GappySource(Stage):
    """``epochs`` epochs of one 2-page batch each, waiting ``gap`` between a batch and its epoch's end (None every
    ``idle_every``, as a tracker waits)."""

    factory_name = "gappy-src"
    output_caps = PAGES
    epochs = Property("int", 2, "epochs")
    gap = Property("duration", "200ms", "wait between an epoch's batch and its end")

    def produce(self) -> Iterator[Batch | None]:
        for epoch in range(self.epochs):
            yield Batch(format=PAGES, epoch=epoch, page_numbers=np.arange(2, dtype=np.uint64) + epoch,
                        kinds=np.zeros(2, np.uint8), data=np.full((2, 4096), epoch, np.uint8))
            resume_at = time.monotonic() + self.gap
            while time.monotonic() < resume_at:
                time.sleep(min(self.idle_every or 0.5, max(0.0, resume_at - time.monotonic())))
                yield None
            yield Batch.control(Flag.EPOCH_END, epoch, pages=2)
        yield Batch.control(Flag.END_OF_STREAM, self.epochs - 1)


@register
class StopMarker(Identity):
    """Pass-through whose stop() writes ``path`` (proof it ran) and then, with ``fail=true``, raises."""

    factory_name = "stop-marker"
    path = Property("str", "", "file written by stop()")
    fail = Property("bool", False, "raise in stop() after writing the file")

    def stop(self) -> None:
        with open(self.path, "w") as file:
            file.write("stopped")
        if self.fail:
            raise RuntimeError(f"planned failure in stop of {self.name}")
