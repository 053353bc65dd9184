"""What ``pagepipe launch`` shows: a live table of per-stage statistics, and a summary at the end."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .bus import Message, RunResult, stage_totals
from .epoch_stats import EpochSeries, distributions
from .units import format_size

EPOCH_ROWS = (
    ("pause_seconds", "pause", "ms"), ("dirty_pages", "dirty pages", ""), ("dirty_bytes", "dirty", "bytes"),
    ("wire_bytes", "wire", "bytes"), ("ratio", "ratio", "ratio"), ("commit_latency_seconds", "checkpoint -> commit", "ms"),
    ("ack_latency_seconds", "checkpoint -> ack", "ms"), ("applied_bytes", "applied", "bytes"),
)
"""Per-epoch values the summary shows (those present), with their labels and units."""


def _value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value * 1e3:.2f} ms"
    if unit == "bytes":
        return format_size(value)
    if unit == "ratio":
        return f"{value:.2f}"
    return f"{value:.0f}"


def epoch_table(series: EpochSeries) -> Table | None:
    """Distributions of the per-epoch statistics (median, p90, p99, max), with the per-stage bytes out;
    None when no epoch was recorded."""
    pipeline = series.pipeline()
    if not pipeline:
        return None
    found = distributions(pipeline)
    table = Table(title=f"per epoch ({len(pipeline)} epochs)", title_justify="left")
    table.add_column("statistic", overflow="fold")
    for column in ("median", "p90", "p99", "max"):
        table.add_column(column, justify="right")
    for key, label, unit in EPOCH_ROWS:
        values = found.get(key)
        if values and values["count"]:
            table.add_row(label, *(_value(values[column], unit) for column in ("median", "p90", "p99", "max")))
    for key, label in (("resync", "resync epochs"), ("discarded", "discarded epochs")):
        total = sum(values.get(key, 0) for values in pipeline.values())
        if total:
            table.add_row(label, f"{total:.0f} in all", "", "", "")
    for stage, epochs in series.stages.items():
        out = distributions(epochs).get("bytes_out")
        if out and out["count"] and out["max"] > 0:
            table.add_row(Text(f"{stage} out"), *(_value(out[column], "bytes") for column in ("median", "p90", "p99", "max")))
    return table


def statistics_table(statistics: dict[tuple[str, int], dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("stage", "workers", "batches in", "pages in", "in", "batches out", "pages out", "out",
                   "busy", "in flight", "counters"):
        if column == "stage":   # names are never cut: a long fused name wraps instead
            table.add_column(column, overflow="fold", min_width=max((len(s) for s in statistics_names(statistics)),
                                                                    default=5))
        else:
            table.add_column(column, justify="left" if column == "counters" else "right", overflow="fold")
    for stage, total in stage_totals(statistics).items():
        elapsed = max(total.get("elapsed_seconds", 0.0) / max(total["workers"], 1), 1e-9)
        busy = total.get("busy_seconds", 0.0) / total["workers"] / elapsed
        name = f"{stage} (in {total['fused_as']})" if "fused_as" in total else stage
        table.add_row(Text(name), str(total["workers"]), str(total.get("batches_in", 0)), str(total.get("pages_in", 0)),
                      format_size(total.get("bytes_in", 0)), str(total.get("batches_out", 0)),
                      str(total.get("pages_out", 0)), format_size(total.get("bytes_out", 0)),
                      f"{100 * busy:.0f}%", format_size(total.get("queue_bytes", 0)),
                      counters_text(total.get("counters", {})))
    return table


def statistics_names(statistics: dict[tuple[str, int], dict[str, Any]]) -> set[str]:
    return {stage for stage, _ in statistics}


def counters_text(counters: dict[str, Any]) -> str:
    """A stage's own counters, compactly: ``hits=120 misses=4``."""
    return " ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in counters.items())


class Progress:
    """Bus listener that keeps a rich Live table up to date (when the console is a terminal)."""

    def __init__(self, console: Console, show_warnings: bool = True):
        self.console = console
        self.show_warnings = show_warnings
        self.statistics: dict[tuple[str, int], dict[str, Any]] = {}
        self._live = Live(statistics_table({}, "running"), console=console, auto_refresh=False,
                          transient=True) if console.is_terminal else None

    def __enter__(self) -> "Progress":
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, message: Message) -> None:
        if message.kind == "stats":
            self.statistics[(message.stage, message.worker)] = message.fields
            if self._live is not None:
                self._live.update(statistics_table(self.statistics, "running"), refresh=True)
        elif message.kind == "warning" and self._live is not None and self.show_warnings:   # else RunLog writes them
            self.console.print(str(message), style="yellow", markup=False, emoji=False, highlight=False)


def print_summary(console: Console, result: RunResult) -> None:
    console.print(statistics_table(result.statistics, f"finished in {result.elapsed_seconds:.2f} s"))
    epochs = epoch_table(result.epochs)
    if epochs is not None:
        console.print(epochs)
    for warning in result.warnings:
        console.print(str(warning), style="yellow", markup=False, emoji=False, highlight=False)
