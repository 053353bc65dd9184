"""One worker's engine: feeds a stage through its fan-in, stamps and counts what it emits.

Both executors wrap a ``WorkerCore`` around each stage instance; they only
differ in how batches reach ``feed`` and where ``emit`` sends them (a direct
call inline, ZeroMQ sockets in processes), so the same stage code sees the
same batches in both modes.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from .batch import Batch, Flag
from .bus import WorkerStatistics, plain_counters
from .errors import ConfigError
from .fusion import Fusion
from .epoch_stats import EpochCounter
from .routing import EpochPageCounter, FanIn
from .stage import Stage, StageContext

IDLE_EVERY = 0.02
"""Seconds a waiting source goes without yielding (see ``Stage.idle_every``): bounds how late a timer runs inline."""
class _Done:
    """What ``_next`` returns once a stage's iterator is exhausted."""


_DONE = _Done()


class WorkerCore:
    """Drive one stage instance: fan-in barrier, ``handle``, epoch-end stamping, statistics."""

    def __init__(self, stage: Stage, context: StageContext, inputs: int, output_format: str | None,
                 emit: Callable[[Batch], None], stamp_pages: bool, elements: list[str] | None = None):
        self.stage = stage
        self.context = context
        self.elements = elements or [context.stage_name]
        """The original elements the stage runs (several when it is a fused stage), for their statistics."""
        self.fan_in = FanIn(max(inputs, 1))
        self._single_input = inputs <= 1
        self.output_format = output_format
        self.emit = emit
        self.page_counter = EpochPageCounter() if stamp_pages else None
        self.stats = WorkerStatistics(context.stage_name, context.worker_index)
        self.finished = False
        self._last_epoch = 0
        self._epoch_counter = EpochCounter()
        self._next_tick = 0.0

    def start(self) -> None:
        self.stage.context = self.context  # also when the stage's start() forgets super().start(context)
        self.stage.start(self.context)

    def stop(self) -> None:
        self.stage.stop()

    def statistics(self) -> list[tuple[str, dict]]:
        """(element name, statistics message body) of each element this worker runs."""
        whole = self.stats.snapshot(self.stage.counters)
        fusion = self.stage.fusion
        if len(self.elements) == 1 or fusion is None:
            return [(self.elements[0], whole)]
        return [(name, member_statistics(whole, fusion, index, name, self.context.stage_name))
                for index, name in enumerate(self.elements)]

    def epoch_records(self) -> list[list]:
        """The per-epoch records waiting to be posted (``epochs`` bus message), taken."""
        return self.context.recorder.take()

    def _close_epoch(self, epoch: int) -> None:
        stats = self.stats
        self._epoch_counter.close(self.context.recorder, epoch, stats.bytes_in, stats.bytes_out,
                                  stats.pages_in, stats.pages_out)

    def feed(self, input_index: int, batch: Batch) -> bool:
        """Give the stage one batch from upstream worker ``input_index``; True once the stream has ended."""
        self.stats.count_in(batch)
        # one input: the fan-in passes each batch as it comes (a marker is its own barrier)
        for released in (batch,) if self._single_input else self.fan_in.push(input_index, batch):
            self._drive(self.stage.handle(released))
            if released.is_control:
                if released.flags & Flag.EPOCH_END:
                    self._close_epoch(released.epoch)
                if released.flags & Flag.END_OF_STREAM:
                    self.finished = True
        return self.finished

    def produce(self) -> Iterator[None]:
        """Run a source; yields after each emitted batch so the executor can check for stop requests.

        A source that ends without an end-of-stream marker gets one, so
        downstream workers always learn that the stream is over (if it has any).
        """
        self.stage.idle_every = IDLE_EVERY
        produced = self.stage.produce()
        if produced is None or not hasattr(produced, "__iter__"):
            raise ConfigError(f"{self.context.stage_name}: produce() returned {type(produced).__name__}, not an "
                              "iterable of batches (yield each batch)")
        outputs = iter(produced)
        ended = False
        while True:
            batch = self._next(outputs)
            if isinstance(batch, _Done):
                break
            if batch is None:   # the source is waiting: a chance for timers and stop requests
                yield
                continue
            ended = bool(batch.is_control and batch.flags & Flag.END_OF_STREAM)
            self._emit(batch)
            if batch.is_control and batch.flags & Flag.EPOCH_END:
                self._close_epoch(batch.epoch)
            yield
        if not ended and self.output_format is not None:   # (a source and sink in one, co-located, has no output)
            self._emit(Batch.control(Flag.END_OF_STREAM, self._last_epoch, format=self.output_format))
        self.finished = True

    def tick(self) -> None:
        """Run the stage's timer (``Stage.tick``) if it is due, emitting what it yields."""
        interval = self.stage.tick_interval
        if interval <= 0 or self.finished:
            return
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + interval
        self._drive(iter(self.stage.tick()))

    def tick_wait(self) -> float | None:
        """Seconds until the stage's timer is due (None: it has none)."""
        if self.stage.tick_interval <= 0 or self.finished:
            return None
        return max(0.0, self._next_tick - time.monotonic())

    def _drive(self, outputs: Iterator[Batch]) -> None:
        stats, clock = self.stats, time.perf_counter   # ``_next`` inlined: this runs once per batch out
        while True:
            began = clock()
            try:
                batch = next(outputs)
            except StopIteration:
                stats.busy_seconds += clock() - began
                return
            stats.busy_seconds += clock() - began
            self._emit(batch)

    def _next(self, outputs: Iterator[Batch | None]) -> Batch | None | _Done:
        began = time.perf_counter()
        try:
            return next(outputs)
        except StopIteration:
            return _DONE
        finally:
            self.stats.busy_seconds += time.perf_counter() - began

    def _emit(self, batch: Batch | None) -> None:
        if not isinstance(batch, Batch):
            raise ConfigError(f"{self.context.stage_name}: emitted {type(batch).__name__}, not a pipeline Batch")
        if self.page_counter is not None:
            batch = self.page_counter.stamp(batch)
        self._last_epoch = batch.epoch
        self.stats.count_out(batch)
        self.emit(batch)


def member_statistics(whole: dict, fusion: Fusion, index: int, name: str, node_name: str) -> dict:
    """Statistics of member ``index`` of a fused stage: traffic through its own links, its own counters, the
    shared worker's time; ``fused_as`` names the node it ran in."""
    stats = dict(whole, stage=name, counters=plain_counters(fusion.members[index].counters), fused_as=node_name)
    if index > 0:
        link = fusion.links[index - 1]
        stats.update(batches_in=link.batches, pages_in=link.pages, bytes_in=link.bytes)
    if index < len(fusion.links):
        link = fusion.links[index]
        stats.update(batches_out=link.batches, pages_out=link.pages, bytes_out=link.bytes)
    return stats
