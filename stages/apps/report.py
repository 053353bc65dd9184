"""``pagepipe report STATS.json [more.json ...] -o report.html``: pictures of runs, side by side.

From ``pagepipe launch --stats-json`` files: pause over time, ratio and wire bytes per epoch,
throughput and CPU per stage, and the distribution of pause and latencies (one colour per run,
so codec A and codec B on the same trace compare at a glance). From ``pagepipe bench NAME
--json`` files: their figures as grouped bars. Writes PNG (``-o x.png``) or a self-contained
HTML page (the PNG inline, and a table of the distributions). Needs matplotlib
(``pip install 'pagepipe[plot]'``).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.errors import ConfigError, PagepipeError
from pipeline.subcommand import Subcommand

FORMATS = (".png", ".html")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("report: plotting needs matplotlib: pip install 'pagepipe[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def load_run(path: Path) -> dict[str, Any]:
    """A statistics or benchmark JSON file; ConfigError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"report: {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"report: {str(path)!r} is a directory, not a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"report: {str(path)!r} is not JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"report: cannot read {str(path)!r}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"report: {str(path)!r} holds no statistics (expected a JSON object)")
    return data


def _is_stats(data: dict[str, Any]) -> bool:
    return isinstance(data.get("epochs"), dict) and isinstance(data.get("stages"), dict)


def _flat_figures(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A benchmark file's numeric figures, nested keys joined with '.'."""
    found: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(_flat_figures(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = float(value)
    return found


def _series(run: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of a pipeline series: x in seconds since the first checkpoint where times exist, else epochs."""
    table = run["epochs"].get("pipeline", {})
    epochs, values = table.get("epoch", []), table.get(key, [])
    times = table.get("time")
    points = [(times[i] if times and times[i] is not None else epoch, value)
              for i, (epoch, value) in enumerate(zip(epochs, values)) if value is not None]
    if times and any(t is not None for t in times):
        start = min(t for t in times if t is not None)
        points = [(x - start, y) for x, y in points]
    return [x for x, _ in points], [y for _, y in points]


def _x_label(runs: list[tuple[str, dict]]) -> str:
    has_time = any(run["epochs"].get("pipeline", {}).get("time") for _, run in runs)
    return "seconds since the first checkpoint" if has_time else "epoch"


def _grouped_bars(axes, runs: list[tuple[str, dict[str, float]]], title: str, unit: str) -> None:
    names = list(dict.fromkeys(name for _, values in runs for name in values))   # pipeline order
    if not names:
        axes.set_visible(False)
        return
    width = 0.8 / max(len(runs), 1)
    for index, (label, values) in enumerate(runs):
        axes.barh([position + index * width for position in range(len(names))],
                  [values.get(name, 0.0) for name in names], height=width, label=label)
    sizes = sorted(value for _, found in runs for value in found.values() if value > 0)
    if sizes and sizes[-1] > 50 * sizes[len(sizes) // 2]:   # one big bar would flatten the others
        axes.set_xscale("log")
        unit += " (log scale)"
    axes.set_yticks([position + width * (len(runs) - 1) / 2 for position in range(len(names))])
    axes.set_yticklabels(names, fontsize=8)
    axes.invert_yaxis()
    axes.set_title(title)
    axes.set_xlabel(unit)


def _stage_rates(run: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Per stage: MB/s out (in for sinks) over the run, and CPU seconds (busy seconds where CPU is not known)."""
    elapsed = max(float(run.get("elapsed_seconds") or 0.0), 1e-9)
    rates, cpu = {}, {}
    for stage, total in run["stages"].items():
        moved = total.get("bytes_out") or total.get("bytes_in") or 0
        rates[stage] = moved / elapsed / 1e6
        cpu[stage] = total.get("cpu_seconds") or total.get("busy_seconds") or 0.0
    return rates, cpu


def _latency_cdf(axes, runs: list[tuple[str, dict]]) -> None:
    drawn = False
    for key, style in (("pause_seconds", "-"), ("commit_latency_seconds", "--"), ("ack_latency_seconds", ":")):
        for index, (label, run) in enumerate(runs):
            _, values = _series(run, key)
            if not values:
                continue
            ordered = sorted(value * 1e3 for value in values)
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axes.plot(ordered, fractions, style, color=f"C{index}", label=f"{label}: {key.split('_')[0]}")
            drawn = True
    axes.set_title("distribution of pause and latencies")
    axes.set_xlabel("ms")
    axes.set_ylabel("fraction of epochs at most")
    if drawn:
        axes.set_xscale("log")
        axes.legend(fontsize=7)


def draw(runs: list[tuple[str, dict[str, Any]]]):
    """The figure for these runs (label, data)."""
    pyplot = _pyplot()
    stats = [(label, data) for label, data in runs if _is_stats(data)]
    benches = [(label, _flat_figures(data)) for label, data in runs if not _is_stats(data)]
    panels = (6 if stats else 0) + (1 if benches else 0)
    columns = 2
    rows = math.ceil(panels / columns)
    figure, grid = pyplot.subplots(rows, columns, figsize=(14, 4.2 * rows), squeeze=False)
    axes = iter(grid.flat)
    if stats:
        x_label = _x_label(stats)
        for key, title, scale, unit in (("pause_seconds", "pause per checkpoint", 1e3, "ms"),
                                        ("ratio", "compression ratio per epoch (dirty / wire bytes)", 1, "x"),
                                        ("wire_bytes", "wire bytes per epoch", 1 / 1024, "KiB")):
            ax = next(axes)
            for index, (label, run) in enumerate(stats):
                xs, ys = _series(run, key)
                ax.plot(xs, [y * scale for y in ys], ".-" if len(xs) < 200 else "-", color=f"C{index}",
                        label=label, markersize=3, linewidth=1)
            ax.set_title(title)
            ax.set_xlabel(x_label)
            ax.set_ylabel(unit)
            values = sorted(y for line in ax.get_lines() for y in line.get_ydata() if y > 0)
            if values and values[-1] > 50 * values[len(values) // 2]:   # a full first copy dwarfs the rest
                ax.set_yscale("log")
                ax.set_ylabel(f"{unit} (log scale)")
            ax.legend(fontsize=7)
        rates = [(label, _stage_rates(run)[0]) for label, run in stats]
        _grouped_bars(next(axes), rates, "throughput per stage (bytes out, or in for sinks)", "MB/s")
        cpu = [(label, _stage_rates(run)[1]) for label, run in stats]
        _grouped_bars(next(axes), cpu, "CPU per stage", "seconds")
        _latency_cdf(next(axes), stats)
    if benches:
        _grouped_bars(next(axes), benches, "benchmark figures", "value (units as in the benchmark)")
    for ax in axes:
        ax.set_visible(False)
    for ax in grid.flat:
        if ax.get_visible() and ax.get_legend_handles_labels()[0] and not ax.get_legend():
            ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _distribution_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    rows = []
    for label, run in runs:
        if not _is_stats(run):
            continue
        found = run["epochs"].get("distributions", {}).get("pipeline", {})
        for key, values in found.items():
            if values.get("count"):
                cells = "".join(f"<td>{values.get(name, 0):.6g}</td>" for name in ("median", "p90", "p99", "max"))
                rows.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(key)}</td>"
                            f"<td>{values['count']}</td>{cells}</tr>")
    if not rows:
        return ""
    return ("<table><tr><th>run</th><th>per epoch</th><th>epochs</th><th>median</th><th>p90</th><th>p99</th>"
            "<th>max</th></tr>" + "".join(rows) + "</table>")


def write_report(paths: list[Path], output: Path) -> None:
    """Read the runs and write the report (PNG or HTML, by ``output``'s suffix)."""
    if output.suffix.lower() not in FORMATS:
        raise ConfigError(f"report: -o {str(output)!r}: write .png or .html")
    if not output.parent.is_dir():
        raise ConfigError(f"report: -o {str(output)!r}: directory {str(output.parent)!r} does not exist")
    labels = [path.stem for path in paths]
    runs = [(label if labels.count(label) == 1 else f"{label} ({index + 1})", load_run(path))
            for index, (label, path) in enumerate(zip(labels, paths))]
    figure = draw(runs)
    pyplot = _pyplot()
    try:
        if output.suffix.lower() == ".png":
            figure.savefig(output, dpi=90)
            return
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=90)
        names = ", ".join(html.escape(label) for label, _ in runs)
        output.write_text(
            "<!doctype html><meta charset='utf-8'><title>pagepipe report</title>"
            "<style>body{font-family:sans-serif} td,th{padding:2px 8px;text-align:right}</style>"
            f"<h1>pagepipe report: {names}</h1>"
            f"<img alt='pause, ratio, wire bytes, throughput, CPU, latency' "
            f"src='data:image/png;base64,{base64.b64encode(image.getvalue()).decode()}'>"
            + _distribution_table(runs))
    except OSError as exc:
        raise PagepipeError(f"report: cannot write {str(output)!r}: {exc.strerror}") from None
    finally:
        pyplot.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="statistics files (pagepipe launch --stats-json) or benchmark files (bench ... --json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the report: NAME.png or NAME.html")


def run(args: argparse.Namespace, console: Console) -> int:
    write_report(list(args.inputs), args.output)
    console.print(f"report written to {args.output}", markup=False, highlight=False)
    return 0


COMMAND = Subcommand("plot runs (launch --stats-json, bench --json) side by side: report X.json -o report.html",
                     add_arguments, run)
