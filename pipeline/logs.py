"""Logs for runs without a terminal: one status line per interval, one line per event.

``RunLog`` is a bus listener. Events (a stage's ``context.event``: connected, waiting,
resync; warnings, among them discarded epochs; failures) are written as they arrive; a
thread of its own writes a status line every ``interval`` seconds, also while every
stage waits (a receiver whose sender has not connected says what it waits for). Lines
are plain text or, with ``fmt="json"``, one JSON object per line for log shippers.
Text from stages and from the wire is written as it is: never interpreted as markup.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable, TextIO

from .bus import Message, json_default, stage_totals
from .epoch_stats import EpochSeries, distributions
from .units import format_size

LOG_FORMATS = ("text", "json")
DEFAULT_INTERVAL = 5.0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def epoch_line(series: EpochSeries, since: int = -1) -> str:
    """The epochs after ``since`` in one line: count, pause, ratio, wire bytes, commit and ack latency."""
    fresh = series.pipeline(since)
    if not fresh:
        return f"epoch {series.latest_epoch()} (no new epochs)"
    found = distributions(fresh)
    parts = [f"epochs {min(fresh)}-{max(fresh)} ({len(fresh)})"]
    for key, label in (("pause_seconds", "pause"), ("commit_latency_seconds", "commit"),
                       ("ack_latency_seconds", "ack")):
        if found.get(key, {}).get("count"):
            parts.append(f"{label} median {_ms(found[key]['median'])} p99 {_ms(found[key]['p99'])}")
    if found.get("ratio", {}).get("count"):
        parts.append(f"ratio {found['ratio']['median']:.1f}")
    if found.get("wire_bytes", {}).get("count"):
        parts.append(f"wire {format_size(sum(v.get('wire_bytes', 0) for v in fresh.values()))}")
    resyncs = sum(int(v.get("resync", 0)) for v in fresh.values())
    discarded = sum(int(v.get("discarded", 0)) for v in fresh.values())
    if resyncs or discarded:
        parts.append(f"resyncs {resyncs}, discarded {discarded}")
    return ", ".join(parts)


class RunLog:
    """Writes a run's events as they come and a status line every ``interval`` seconds."""

    def __init__(self, stream: TextIO | None = None, interval: float = DEFAULT_INTERVAL, fmt: str = "text",
                 wire_links: list[tuple[str, str]] | None = None, status: bool = True,
                 write: Callable[[str], None] | None = None, order: list[str] | None = None):
        self.stream = stream or sys.stdout
        self.interval = interval
        self.fmt = fmt
        self.status = status
        self.order = {name: index for index, name in enumerate(order or [])}
        self.series = EpochSeries(wire_links or [], order=self.order)
        self.statistics: dict[tuple[str, int], dict[str, Any]] = {}
        self.waiting: dict[str, str] = {}
        self._write_line = write
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_epoch = -1
        self._last_bytes: dict[str, tuple[float, int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------
    def __enter__(self) -> "RunLog":
        if self.status and self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="pagepipe-log", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write_status()

    # ---- bus -----------------------------------------------------------
    def __call__(self, message: Message) -> None:
        kind, fields = message.kind, message.fields
        with self._lock:
            if kind == "stats":
                self.statistics[(message.stage, message.worker)] = fields
                return
            if kind == "epochs":
                self.series.add(message.stage, fields.get("records"))
                return
        if kind == "event":
            name = str(fields.get("event", "event"))
            with self._lock:
                if name == "waiting":
                    self.waiting[message.stage] = str(fields.get("message", ""))
                else:
                    self.waiting.pop(message.stage, None)
            self._event(name, message, str(fields.get("message", "")))
        elif kind == "warning":
            self._event(str(fields.get("event", "warning")), message, str(fields.get("message", "")))
        elif kind == "error":
            self._event("failure", message, str(fields.get("reason", "")))

    def _event(self, name: str, message: Message, text: str) -> None:
        extra = {key: value for key, value in message.fields.items()
                 if key not in ("event", "message", "reason", "traceback")}
        self._emit({"type": "event", "event": name, "stage": message.stage, "worker": message.worker,
                    "message": text, **extra},
                   f"{name}: {message.stage}[{message.worker}]: {text}")

    # ---- status --------------------------------------------------------
    def status_record(self) -> dict[str, Any]:
        """What a status line says, as a dict: elapsed time, per-stage rates, epochs since the last line."""
        now = time.monotonic()
        with self._lock:
            last = len(self.order)
            totals = dict(sorted(stage_totals(self.statistics).items(),
                                 key=lambda item: self.order.get(item[0], last)))
            fresh = self.series.pipeline(self._last_epoch)
            waiting = dict(self.waiting)
        self._last_epoch = max(fresh, default=self._last_epoch)
        stages = {}
        for name, total in totals.items():
            bytes_in, bytes_out = int(total.get("bytes_in", 0)), int(total.get("bytes_out", 0))
            then, old_in, old_out = self._last_bytes.get(name, (self._started, 0, 0))
            span = max(now - then, 1e-9)
            self._last_bytes[name] = (now, bytes_in, bytes_out)
            stages[name] = {"workers": total["workers"], "batches_in": int(total.get("batches_in", 0)),
                            "bytes_in": bytes_in, "bytes_out": bytes_out,
                            "in_per_second": (bytes_in - old_in) / span, "out_per_second": (bytes_out - old_out) / span}
        return {"type": "status", "elapsed_seconds": round(now - self._started, 3), "epoch": self._last_epoch,
                "new_epochs": len(fresh), "epochs": distributions(fresh), "stages": stages, "waiting": waiting}

    def write_status(self) -> None:
        """Write one status line (the thread calls it every interval)."""
        since = self._last_epoch
        record = self.status_record()
        with self._lock:
            line = epoch_line(self.series, since) if record["new_epochs"] else ""
        parts = [f"status {record['elapsed_seconds']:.1f} s"]
        if line:
            parts.append(line)
        elif record["epoch"] > 0:
            parts.append(f"epoch {record['epoch']} (no new epochs)")
        for name, stage in record["stages"].items():
            parts.append(f"{name} in {format_size(stage['in_per_second'])}/s out {format_size(stage['out_per_second'])}/s")
        for name, text in record["waiting"].items():
            parts.append(f"{name} {text}")
        if not record["stages"] and not record["waiting"]:
            parts.append("starting")
        self._emit(record, "; ".join(parts))

    def _emit(self, record: dict[str, Any], text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        if self.fmt == "json":
            line = json.dumps({"time": stamp, **record}, default=json_default)
        else:
            line = f"{stamp} pagepipe {text}"
        with self._lock:
            if self._write_line is not None:
                self._write_line(line)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
