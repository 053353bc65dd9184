"""The bus: what stages tell the supervisor, and the statistics they keep.

Every worker posts ``Message``s: ``stats`` about once a second and once at the
end (preceded by ``epochs``, the per-epoch records taken since the last one; see
pipeline.epoch_stats), ``warning``, ``event`` (something a log shows as it happens:
connected, waiting, resync), ``error`` (with exception and traceback), ``eos`` when
its stream has ended and ``done`` when it is about to exit. Messages are plain
JSON-able dicts on the wire so the bus never unpickles anything. Stages may
post other kinds through ``StageContext.post``; they reach listeners as they are.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .batch import Batch
from .epoch_stats import EpochSeries
from .errors import CorruptData

STATS_INTERVAL = 1.0
"""Seconds between statistics messages of one worker."""
TIMELINE_LIMIT = 100_000
"""Statistics samples kept per worker for the timeline (about a day at one a second)."""
TIMELINE_KEYS = ("bytes_in", "bytes_out", "pages_out", "busy_seconds", "cpu_seconds")


def json_default(value: Any) -> Any:
    """JSON for values stages put in message fields: numpy scalars and arrays as numbers and lists, else text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


@dataclass
class Message:
    """One bus message: what happened, in which stage and worker."""

    kind: str
    stage: str
    worker: int
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The wire form (JSON-able; see ``json_default`` for numpy values in fields)."""
        return {"kind": self.kind, "stage": self.stage, "worker": self.worker, "fields": self.fields}

    @classmethod
    def from_dict(cls, data: Any) -> "Message":
        """A message from its wire form; CorruptData if it is not one."""
        try:
            message = cls(str(data["kind"]), str(data["stage"]), int(data["worker"]), dict(data.get("fields") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptData(f"bus message malformed ({exc!r}): {str(data)[:200]}") from None
        return message

    def __str__(self) -> str:
        where = f"{self.stage}[{self.worker}]"
        if self.kind == "warning":
            return f"warning from {where}: {self.fields.get('message', '')}"
        if self.kind == "error":
            return f"error in {where}: {self.fields.get('reason', '')}"
        return f"{self.kind} from {where}"


@dataclass
class WorkerStatistics:
    """Counts one worker keeps: what came in, what went out, time spent in stage code."""

    stage: str
    worker: int
    batches_in: int = 0
    pages_in: int = 0
    bytes_in: int = 0
    batches_out: int = 0
    pages_out: int = 0
    bytes_out: int = 0
    busy_seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the worker's process since its stage started (process mode; 0 for workers sharing a process)."""
    queue_bytes: int = 0
    counters: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    elapsed_seconds: float = 0.0

    def count_in(self, batch: Batch) -> None:
        self.batches_in += 1
        self.pages_in += batch.npages
        self.bytes_in += batch.nbytes

    def count_out(self, batch: Batch) -> None:
        self.batches_out += 1
        self.pages_out += batch.npages
        self.bytes_out += batch.nbytes

    def snapshot(self, counters: dict[str, Any]) -> dict[str, Any]:
        """The statistics as a bus message body (JSON-able)."""
        self.elapsed_seconds = time.monotonic() - self.started
        self.counters = plain_counters(counters)
        values = asdict(self)
        del values["started"]
        return values


def plain_counters(counters: dict[str, Any]) -> dict[str, Any]:
    """A stage's counters as JSON-able values (numpy scalars as Python numbers; other values left out)."""
    return {str(k): v.item() if isinstance(v, np.generic) else v for k, v in counters.items()
            if isinstance(v, (int, float, str, bool, np.generic))}


def stage_totals(statistics: dict[tuple[str, int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-stage sums of per-worker statistics, in first-seen order, with a ``workers`` count.

    The stage's own ``counters`` are summed the same way (numbers; other values as the last worker has them);
    ``fused_as`` names the fused node an element ran in, if it did.
    """
    totals: dict[str, dict[str, Any]] = {}
    for (stage, _), stats in statistics.items():
        total = totals.setdefault(stage, {"workers": 0, "counters": {}})
        total["workers"] += 1
        _add_numbers(total, stats, skip=("worker",))
        _add_numbers(total["counters"], stats.get("counters") or {}, keep_other=True)
        if "fused_as" in stats:
            total["fused_as"] = stats["fused_as"]
    return totals


def _add_numbers(total: dict[str, Any], values: dict[str, Any], skip: tuple[str, ...] = (),
                 keep_other: bool = False) -> None:
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in skip:
            total[key] = total.get(key, 0) + value
        elif keep_other and not isinstance(value, dict):
            total[key] = value


@dataclass
class RunResult:
    """What a finished run leaves: final statistics per (stage, worker), warnings, wall time."""

    statistics: dict[tuple[str, int], dict[str, Any]]
    warnings: list[Message]
    elapsed_seconds: float
    epochs: EpochSeries = field(default_factory=EpochSeries)
    """Per-epoch statistics of every stage (pipeline.epoch_stats)."""
    timeline: dict[str, dict[str, list]] = field(default_factory=dict)
    """Per worker (``stage[worker]``): seconds since the start and cumulative counts at each statistics message."""

    def totals(self, stage: str) -> dict[str, Any]:
        """Statistics of one stage summed over its workers (empty if it reported none)."""
        return stage_totals(self.statistics).get(stage, {})

    def to_json(self) -> dict[str, Any]:
        return {
            "elapsed_seconds": self.elapsed_seconds,
            "workers": [stats for stats in self.statistics.values()],
            "stages": stage_totals(self.statistics),
            "warnings": [m.to_dict() for m in self.warnings],
            "epochs": self.epochs.to_json(),
            "timeline": self.timeline,
        }


class Collector:
    """Keeps the latest statistics and the warnings while forwarding every message to listeners."""

    def __init__(self, listeners: Iterable[Callable[[Message], None]] = (), stage_order: Iterable[str] = (),
                 wire_links: Iterable[tuple[str, str]] = (), epoch_order: Iterable[str] = ()):
        self.stage_order = {name: index for index, name in enumerate(stage_order)}
        self.listeners = [listener for listener in listeners if listener is not None]
        self.statistics: dict[tuple[str, int], dict[str, Any]] = {}
        self.warnings: list[Message] = []
        self.epochs = EpochSeries(wire_links, order=list(epoch_order) or list(self.stage_order))
        """Per-epoch records come per node of the plan (a fused node under its fused name)."""
        self.timeline: dict[str, dict[str, list]] = {}
        self.started = time.monotonic()

    def post(self, message: Message) -> None:
        if message.kind == "stats":
            self.statistics[(message.stage, message.worker)] = message.fields
            self._sample(message)
        elif message.kind == "epochs":
            self.epochs.add(message.stage, message.fields.get("records"))
        elif message.kind == "warning":
            self.warnings.append(message)
        for listener in self.listeners:
            listener(message)

    def _sample(self, message: Message) -> None:
        series = self.timeline.setdefault(f"{message.stage}[{message.worker}]",
                                          {"seconds": [], **{key: [] for key in TIMELINE_KEYS}})
        if len(series["seconds"]) >= TIMELINE_LIMIT:
            for values in series.values():
                del values[:len(values) // 2]
        series["seconds"].append(round(time.monotonic() - self.started, 3))
        for key in TIMELINE_KEYS:
            value = message.fields.get(key, 0)
            series[key].append(value if isinstance(value, (int, float)) else 0)

    def result(self) -> RunResult:
        last = len(self.stage_order)
        ordered = dict(sorted(self.statistics.items(),
                              key=lambda item: (self.stage_order.get(item[0][0], last), item[0])))
        return RunResult(ordered, list(self.warnings), time.monotonic() - self.started, self.epochs,
                         self.timeline)
