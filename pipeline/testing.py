"""A stage author's test kit: drive one stage, or a small chain, inline and deterministically.

Modelled on GStreamer's GstHarness: push batches (pages, epoch ends, layouts,
end of stream) into the first stage and get back what the last one emits. The
stages run as the runtime runs them (``pipeline.core.WorkerCore``: the context
set, epoch ends stamped with their page counts, statistics kept), in the
calling thread, with no process or socket; a stage's own exceptions surface
unchanged, so ``pytest.raises(CorruptData)`` works::

    from pipeline.testing import Harness, pages_batch

    with Harness(MyClassify(), XorDelta(cache_pages=8)) as harness:
        (out,) = harness.push(pages_batch([3, 4], epoch=1))
        harness.end_epoch()
    assert harness.statistics()["my-classify"]["counters"]["raw"] == 2

``pages_batch`` makes a PAGES batch from page numbers (and optionally data,
kinds or zero pages), ``layout_batch`` a LAYOUT marker, ``page_kinds`` reads a
batch's kinds by page. Sources run with ``produce()``.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from .batch import ANY, DEFAULT_PAGE_SIZE, PAGES, Batch, Flag, PageKind
from .bus import Message
from .core import WorkerCore
from .routing import PAGE_FORMATS
from .stage import Stage, StageContext


def pages_batch(page_numbers: Iterable[int], data: np.ndarray | None = None, *, kinds: Iterable[int] | None = None,
                zero: Iterable[int] = (), epoch: int = 1, page_size: int = DEFAULT_PAGE_SIZE,
                flags: Flag = Flag.NONE, **fields: Any) -> Batch:
    """A PAGES batch of ``page_numbers``.

    ``data``: the pages' contents, any array of ``n * page_size`` bytes (reshaped to ``(n, page_size)``);
    by default page p is filled with the byte ``p % 255 + 1`` (never all zeros), except the pages listed in
    ``zero``. ``kinds``: default NORMAL. Other ``fields`` (``meta=``, ``stream=``, ``format=``...) go to the
    Batch as they are.
    """
    numbers = np.asarray(list(page_numbers) if not isinstance(page_numbers, np.ndarray) else page_numbers,
                         dtype=np.uint64)
    if data is None:
        data = np.repeat((numbers % 255 + 1).astype(np.uint8)[:, None], page_size, axis=1)
    data = np.ascontiguousarray(np.asarray(data, dtype=np.uint8).reshape(numbers.shape[0], page_size))
    zero_rows = np.isin(numbers, np.asarray(list(zero), dtype=np.uint64))
    if zero_rows.any():
        data = data.copy()
        data[zero_rows] = 0
    kinds_array = (np.full(numbers.shape[0], PageKind.NORMAL, np.uint8) if kinds is None
                   else np.asarray(list(kinds) if not isinstance(kinds, np.ndarray) else kinds, dtype=np.uint8))
    return Batch(format=fields.pop("format", PAGES), epoch=epoch, flags=flags, page_size=page_size,
                 page_numbers=numbers, kinds=kinds_array, data=data, **fields)


def page_kinds(batch: Batch) -> dict[int, PageKind]:
    """Page number -> kind of every page of ``batch``."""
    return {int(page): PageKind(int(kind)) for page, kind in zip(batch.page_numbers, batch.kinds)}


def layout_batch(regions: Iterable[dict[str, Any] | Sequence[Any]], epoch: int = 1, *,
                 page_size: int = DEFAULT_PAGE_SIZE, format: str = PAGES, **meta: Any) -> Batch:
    """A LAYOUT marker; each region a dict or a ``(name, start, first_page, npages)`` tuple."""
    rows = [dict(region) if isinstance(region, dict) else
            dict(zip(("name", "start", "first_page", "npages"), region)) for region in regions]
    return Batch.control(Flag.LAYOUT, epoch, format=format, page_size=page_size, regions=rows, **meta)


class Harness:
    """Run ``stages`` (linked in that order) in this thread; ``push`` returns what the last stage emits.

    ``input_format``: what will be pushed (default: the first stage's first input format, PAGES for ``any``),
    from which each stage's output format follows as in a pipeline.
    """

    def __init__(self, *stages: Stage, worker_index: int = 0, worker_count: int = 1,
                 input_format: str | None = None):
        if not stages:
            raise ValueError("Harness needs at least one stage")
        self.stages = list(stages)
        self.messages: list[Message] = []
        """Every bus message the stages posted (warnings and their own kinds), in order."""
        self.outputs: list[Batch] = []
        """Everything the last stage emitted so far."""
        self._pulled: list[Batch] = []
        self._epoch = 1  # markers pushed without an epoch get the last pushed batch's (pages_batch: 1)
        self._stopped = False
        self._cores: list[WorkerCore] = []
        emit = self._pulled.append
        caps = self.stages[0].input_caps
        fmt = input_format or (caps[0] if caps and caps[0] != ANY else None if not caps else PAGES)
        formats = []
        for stage in self.stages:  # formats flow front to back, links are built back to front
            fmt = stage.output_format(fmt)
            formats.append(fmt)
        for stage, output_format in reversed(list(zip(self.stages, formats))):
            name = stage.name or stage.factory_name or type(stage).__name__
            context = StageContext(name, worker_index, worker_count, post=self._poster(name, worker_index))
            core = WorkerCore(stage, context, 1, output_format, emit, output_format in PAGE_FORMATS)
            self._cores.insert(0, core)
            emit = _feeder(core)
        for core in self._cores:
            core.start()

    def _poster(self, stage: str, worker: int):
        return lambda kind, **fields: self.messages.append(Message(kind, stage, worker, fields))

    @property
    def stage(self) -> Stage:
        """The first (or only) stage."""
        return self.stages[0]

    # ---- pushing ------------------------------------------------------------
    def push(self, *batches: Batch) -> list[Batch]:
        """Feed ``batches`` to the first stage; what the last stage emitted meanwhile."""
        for batch in batches:
            self._epoch = batch.epoch
            self._cores[0].feed(0, batch)
        return self._pull()

    def push_one(self, batch: Batch) -> Batch:
        """Feed one batch that must come out as exactly one batch; that batch."""
        out = self.push(batch)
        if len(out) != 1:
            raise AssertionError(f"expected one batch out, got {len(out)}")
        return out[0]

    def end_epoch(self, epoch: int | None = None, **meta: Any) -> list[Batch]:
        """Close ``epoch`` (default: the last pushed) with an EPOCH_END marker."""
        return self.push(Batch.control(Flag.EPOCH_END, self._epoch if epoch is None else epoch, **meta))

    def layout(self, regions: Iterable[dict[str, Any] | Sequence[Any]], epoch: int | None = None,
               **meta: Any) -> list[Batch]:
        """Push a LAYOUT marker (see ``layout_batch``)."""
        return self.push(layout_batch(regions, self._epoch if epoch is None else epoch, **meta))

    def end_stream(self, epoch: int | None = None) -> list[Batch]:
        """Push END_OF_STREAM, then stop every stage; what came out."""
        out = self.push(Batch.control(Flag.END_OF_STREAM, self._epoch if epoch is None else epoch))
        self.stop()
        return out

    def produce(self, limit: int | None = None) -> list[Batch]:
        """Run the first stage as a source (to its end, or until it emitted ``limit`` batches); what came out."""
        if not self.stages[0].is_source:
            raise TypeError(f"{self._cores[0].context.stage_name} is not a source; push batches into it")
        for count, _ in enumerate(self._cores[0].produce(), start=1):
            if limit is not None and count >= limit:
                break
        return self._pull()

    # ---- results ------------------------------------------------------------
    @property
    def warnings(self) -> list[str]:
        """The text of every warning posted."""
        return [str(m.fields.get("message", "")) for m in self.messages if m.kind == "warning"]

    def statistics(self) -> dict[str, dict[str, Any]]:
        """Each element's statistics as the bus would report them (counters under ``"counters"``)."""
        return {name: stats for core in self._cores for name, stats in core.statistics()}

    def stop(self) -> None:
        """Stop every stage (once; also on leaving a ``with`` block)."""
        if not self._stopped:
            self._stopped = True
            for core in self._cores:
                core.stop()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _pull(self) -> list[Batch]:
        out, self._pulled[:] = list(self._pulled), []
        self.outputs.extend(out)
        return out


def _feeder(core: WorkerCore):
    return lambda batch: core.feed(0, batch)
