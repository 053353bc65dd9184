"""Per-epoch statistics: one mechanism for every stage, gathered over the bus into series.

A stage records what it measured about one epoch (one checkpoint) with
``self.context.record_epoch(epoch, pause_seconds=0.0012, dirty_pages=310)``; the runtime
adds, for every stage, the bytes and pages that came in and went out between two epoch
ends (``bytes_in``, ``bytes_out``, ``pages_in``, ``pages_out``). Records wait in the worker
(a deque: appending is thread safe and costs well under a microsecond) and travel with the
statistics, once a second, as one ``epochs`` bus message. The supervisor's ``EpochSeries``
merges them per stage and epoch and derives the pipeline's series.

Names in use (record any other numeric name the same way; it reaches the series, the
``--stats-json`` output, the report, the Prometheus endpoint):

- trackers: ``pause_seconds``, ``dirty_pages``, ``dirty_bytes``, ``time`` (wall clock of the
  checkpoint, ``time.time()``), ``resync`` (1 for a resync epoch), ``ack_latency_seconds``
  (checkpoint to acknowledgement, when an ack channel is attached);
- replica-sink: ``commit_latency_seconds`` (sender's checkpoint time to commit; the two
  clocks must agree across hosts), ``applied_bytes``, ``discarded`` (1), ``resync_requests``.

Records go by plan node: stages run fused (``classify0+xor-delta0+rle0``) record under the
fused node's name. Merging the workers of one stage: values whose name ends in ``_seconds``, and ``time``,
take the maximum (a pause is as long as its longest part); every other value adds up.
The pipeline series merges every stage's own values the same way and adds ``wire_bytes``
(the bytes of the first framed-stream link that has the epoch) and ``ratio``
(``dirty_bytes`` or ``applied_bytes`` over ``wire_bytes``).
"""
from __future__ import annotations

import collections
from typing import Any, Iterable

import numpy as np

RUNTIME_KEYS = ("bytes_in", "bytes_out", "pages_in", "pages_out")
"""What the runtime records for every stage at each epoch end."""
MAX_EPOCHS = 200_000
"""Epochs kept per stage in the supervisor; the oldest go first (a long run keeps its recent hours)."""
QUANTILES = (("median", 50.0), ("p90", 90.0), ("p99", 99.0))


def takes_maximum(key: str) -> bool:
    """Whether values named ``key`` merge by maximum (durations, times) rather than by sum."""
    return key.endswith("_seconds") or key == "time"


class EpochRecorder:
    """A worker's records not yet posted: (epoch, values) pairs, appended from any thread."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()

    def take(self) -> list[list]:
        """Every waiting record, oldest first, as JSON-able ``[epoch, values]`` pairs."""
        taken = []
        pop = self.pending.popleft
        while self.pending:
            epoch, values = pop()
            taken.append([epoch, values])
        return taken


class EpochCounter:
    """The runtime's part: a worker's bytes and pages in and out since its last epoch end."""

    __slots__ = ("marks",)

    def __init__(self) -> None:
        self.marks = (0, 0, 0, 0)

    def close(self, recorder: EpochRecorder, epoch: int, bytes_in: int, bytes_out: int, pages_in: int,
              pages_out: int) -> None:
        """Record the counts since the previous epoch end for ``epoch``."""
        last = self.marks
        self.marks = (bytes_in, bytes_out, pages_in, pages_out)
        recorder.pending.append((epoch, {"bytes_in": bytes_in - last[0], "bytes_out": bytes_out - last[1],
                                         "pages_in": pages_in - last[2], "pages_out": pages_out - last[3]}))


_MAXIMUM_KEYS: dict[str, bool] = {}
"""takes_maximum, remembered per name: the supervisor merges every record of every worker."""


def _merge(into: dict[str, float], values: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """Merge ``values`` (numbers; booleans count as 0 or 1; anything else, and NaN, is no measurement) into
    ``into`` by sum or maximum (``takes_maximum``)."""
    for key, value in values.items():
        kind = type(value)
        if kind is not int and kind is not float:
            if kind is bool:
                value = float(value)
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
        if value != value or key in skip:  # NaN
            continue
        old = into.get(key)
        if old is None:
            into[key] = value
            continue
        maximum = _MAXIMUM_KEYS.get(key)
        if maximum is None:
            maximum = _MAXIMUM_KEYS[key] = takes_maximum(key)
        into[key] = (old if old >= value else value) if maximum else old + value


def distribution(values: Iterable[float]) -> dict[str, float | int]:
    """count, median, p90, p99 and max of ``values`` (count 0 alone when there are none)."""
    array = np.fromiter(values, dtype=np.float64)
    if not array.size:
        return {"count": 0}
    found: dict[str, float | int] = {"count": int(array.size)}
    for name, value in zip((name for name, _ in QUANTILES),
                           np.percentile(array, [q for _, q in QUANTILES])):
        found[name] = float(value)
    found["max"] = float(array.max())
    return found


def columns(epochs: dict[int, dict[str, float]]) -> dict[str, list]:
    """Series as columns: ``epoch`` and one list per value name (None where an epoch lacks it)."""
    ordered = sorted(epochs)
    keys = sorted({key for values in epochs.values() for key in values})
    table: dict[str, list] = {"epoch": ordered}
    for key in keys:
        table[key] = [epochs[epoch].get(key) for epoch in ordered]
    return table


class EpochSeries:
    """The supervisor's per-epoch statistics: per stage, per epoch, the merged values of its workers."""

    def __init__(self, wire_links: Iterable[tuple[str, str]] = (), limit: int = MAX_EPOCHS,
                 order: Iterable[str] = ()):
        self.wire_links = list(wire_links)
        self.order = {name: index for index, name in enumerate(order)}
        """Stage names in pipeline order (stages are listed in it; others after, as they came)."""
        """(stage, "bytes_out" or "bytes_in") whose per-epoch bytes are the wire bytes, first found wins."""
        self.limit = limit
        self.stages: dict[str, dict[int, dict[str, float]]] = {}
        self.records = 0
        self.dropped = 0

    def add(self, stage: str, records: Any) -> None:
        """Merge an ``epochs`` message's records; malformed entries are skipped."""
        if not isinstance(records, list):
            return
        epochs = self.stages.get(stage)
        if epochs is None:
            self.stages[stage] = epochs = {}
            last = len(self.order)
            self.stages = dict(sorted(self.stages.items(), key=lambda item: self.order.get(item[0], last)))
        limit = self.limit
        for record in records:
            try:
                epoch, values = record
                if type(epoch) is not int:
                    epoch = int(epoch)
            except (TypeError, ValueError):
                continue
            if type(values) is not dict:
                continue
            merged = epochs.get(epoch)
            if merged is None:
                merged = epochs[epoch] = {}
                if len(epochs) > limit:   # the first recorded, the oldest but for stragglers (min() is O(epochs))
                    del epochs[next(iter(epochs))]
                    self.dropped += 1
            _merge(merged, values)
            self.records += 1

    def pipeline(self, since: int = -1) -> dict[int, dict[str, float]]:
        """Per epoch after ``since``: every stage's own values merged, plus ``wire_bytes`` and ``ratio``
        where known."""
        combined: dict[int, dict[str, float]] = {}
        for epochs in self.stages.values():
            for epoch, values in epochs.items():
                if epoch > since:
                    _merge(combined.setdefault(epoch, {}), values, skip=RUNTIME_KEYS)
        for epoch, values in combined.items():
            for stage, key in self.wire_links:
                wire = self.stages.get(stage, {}).get(epoch, {}).get(key)
                if wire:
                    values["wire_bytes"] = wire
                    break
            payload = values.get("dirty_bytes", values.get("applied_bytes"))
            if payload is not None and values.get("wire_bytes"):
                values["ratio"] = payload / values["wire_bytes"]
        return combined

    def latest_epoch(self) -> int:
        return max((max(epochs) for epochs in self.stages.values() if epochs), default=0)

    def to_json(self) -> dict[str, Any]:
        """Series (as columns) and distributions, of the pipeline and of every stage."""
        pipeline = self.pipeline()
        stages = {name: columns(epochs) for name, epochs in self.stages.items()}
        return {
            "count": len(pipeline), "records": self.records, "dropped": self.dropped,
            "pipeline": columns(pipeline),
            "stages": stages,
            "distributions": {
                "pipeline": distributions(pipeline),
                "stages": {name: distributions(epochs) for name, epochs in self.stages.items()},
            },
        }


def distributions(epochs: dict[int, dict[str, float]]) -> dict[str, dict[str, float | int]]:
    """The distribution of every value name (``time`` aside) over these epochs."""
    keys = sorted({key for values in epochs.values() for key in values} - {"time"})
    return {key: distribution(values[key] for values in epochs.values() if key in values) for key in keys}
