"""What ``pagepipe launch`` shows: a live table of per-stage statistics, and a summary at the end."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .bus import Message, RunResult, stage_totals
from .units import format_size


def statistics_table(statistics: dict[tuple[str, int], dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("stage", "workers", "batches in", "pages in", "in", "batches out", "pages out", "out",
                   "busy", "in flight", "counters"):
        table.add_column(column, justify="left" if column in ("stage", "counters") else "right")
    for stage, total in stage_totals(statistics).items():
        elapsed = max(total.get("elapsed_seconds", 0.0) / max(total["workers"], 1), 1e-9)
        busy = total.get("busy_seconds", 0.0) / total["workers"] / elapsed
        name = f"{stage} (in {total['fused_as']})" if "fused_as" in total else stage
        table.add_row(name, str(total["workers"]), str(total.get("batches_in", 0)), str(total.get("pages_in", 0)),
                      format_size(total.get("bytes_in", 0)), str(total.get("batches_out", 0)),
                      str(total.get("pages_out", 0)), format_size(total.get("bytes_out", 0)),
                      f"{100 * busy:.0f}%", format_size(total.get("queue_bytes", 0)),
                      counters_text(total.get("counters", {})))
    return table


def counters_text(counters: dict[str, Any]) -> str:
    """A stage's own counters, compactly: ``hits=120 misses=4``."""
    return " ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in counters.items())


class Progress:
    """Bus listener that keeps a rich Live table up to date (when the console is a terminal)."""

    def __init__(self, console: Console):
        self.console = console
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
        elif message.kind == "warning":
            self.console.print(f"[yellow]{message}[/yellow]")


def print_summary(console: Console, result: RunResult) -> None:
    console.print(statistics_table(result.statistics, f"finished in {result.elapsed_seconds:.2f} s"))
    for warning in result.warnings:
        console.print(f"[yellow]{warning}[/yellow]")
