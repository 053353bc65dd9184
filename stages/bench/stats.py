"""``pagepipe bench stats``: CPU cost of the per-epoch statistics, per recorded epoch per stage.

Measured directly (CPU time of the code paths, not a throughput difference): a stage's
``context.record_epoch`` (a tracker's six values) and the runtime's bytes-per-epoch record;
the worker taking the records and encoding the ``epochs`` bus message as ``Worker.post``
does; the supervisor decoding it and merging it into the ``EpochSeries``. Target: at most
20 us per epoch per stage, all three together. The series' summary (distributions, JSON),
made once per run, is shown per epoch too. With matplotlib, the time ``pagepipe report`` takes
for a 60-second run (40 checkpoints/s through seven stages; target < 5 s).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from pipeline.bus import Message, json_default
from pipeline.epoch_stats import EpochCounter, EpochSeries
from pipeline.stage import StageContext

TARGET_US = 20.0
TARGET_REPORT_SECONDS = 5.0
REPORT_STAGES = ("workload-src0", "classify0+xor-delta0+rle0", "zstd0", "frame0", "deframe0", "decode0",
                 "replica-sink0")
MESSAGE_EVERY = 40
"""Records per ``epochs`` message: a worker posts once a second, so 40 at 40 checkpoints/s."""


def _cpu() -> float:
    return time.thread_time()


def record_cost(epochs: int) -> float:
    """CPU seconds per epoch in the stage: a tracker's record and the runtime's bytes record."""
    context = StageContext("bench")
    counter = EpochCounter()
    began = _cpu()
    for epoch in range(epochs):
        context.record_epoch(epoch, pause_seconds=0.0012, dirty_pages=310, dirty_bytes=310 * 4096,
                             time=1.7e9 + epoch, resync=0)
        counter.close(context.recorder, epoch, epoch * 1000, epoch * 100, epoch * 10, epoch * 10)
        if len(context.recorder.pending) > 4096:
            context.recorder.pending.clear()
    return (_cpu() - began) / epochs


def _recorded(epochs: int) -> list[list]:
    context = StageContext("bench")
    counter = EpochCounter()
    for epoch in range(epochs):
        context.record_epoch(epoch, pause_seconds=0.0012, dirty_pages=310, dirty_bytes=310 * 4096,
                             time=1.7e9 + epoch, resync=0)
        counter.close(context.recorder, epoch, epoch * 1000, epoch * 100, epoch * 10, epoch * 10)
    return context.recorder.take()


def transport_cost(epochs: int) -> tuple[float, float]:
    """CPU seconds per epoch: worker (take + encode the bus message), supervisor (decode + merge)."""
    context = StageContext("bench")
    counter = EpochCounter()
    encoded: list[bytes] = []
    worker = 0.0
    for start in range(0, epochs, MESSAGE_EVERY):
        for epoch in range(start, min(start + MESSAGE_EVERY, epochs)):
            context.record_epoch(epoch, pause_seconds=0.0012, dirty_pages=310, dirty_bytes=310 * 4096,
                                 time=1.7e9 + epoch, resync=0)
            counter.close(context.recorder, epoch, epoch * 1000, epoch * 100, epoch * 10, epoch * 10)
        began = _cpu()
        records = context.recorder.take()
        message = Message("epochs", "bench0", 0, {"records": records})
        encoded.append(json.dumps(message.to_dict(), default=json_default).encode())
        worker += _cpu() - began
    series = EpochSeries()
    began = _cpu()
    for raw in encoded:
        message = Message.from_dict(json.loads(raw))
        series.add(message.stage, message.fields.get("records"))
    supervisor = _cpu() - began
    assert len(series.stages["bench0"]) == epochs
    return worker / epochs, supervisor / epochs


def summary_cost(epochs: int) -> float:
    """CPU seconds per epoch of the run's summary (series as columns, distributions, JSON)."""
    series = EpochSeries()
    series.add("bench0", _recorded(epochs))
    began = _cpu()
    json.dumps(series.to_json())
    return (_cpu() - began) / epochs


def sixty_second_run(seconds: float = 60.0, rate: float = 40.0) -> dict:
    """The --stats-json of a run of ``seconds`` at ``rate`` checkpoints/s through REPORT_STAGES, as
    the supervisor would write it (made up numbers of the shapes a real run has)."""
    rng = random.Random(1)
    series = EpochSeries([("frame0", "bytes_out")], order=REPORT_STAGES)
    for epoch in range(1, int(seconds * rate) + 1):
        dirty = rng.randint(380, 440)
        wire = dirty * 4096 // rng.uniform(100, 120)
        series.add("workload-src0", [[epoch, {"pause_seconds": rng.lognormvariate(-7.3, 0.6), "dirty_pages": dirty,
                                              "dirty_bytes": dirty * 4096, "time": 1.7e9 + epoch / rate, "resync": 0,
                                              "bytes_out": dirty * 4100, "pages_out": dirty}]])
        for stage in REPORT_STAGES[1:]:
            series.add(stage, [[epoch, {"bytes_in": wire, "bytes_out": wire, "pages_in": dirty, "pages_out": dirty}]])
        series.add("replica-sink0", [[epoch, {"commit_latency_seconds": rng.lognormvariate(-4.5, 0.5),
                                              "applied_bytes": dirty * 4096}]])
    stages = {stage: {"workers": 1, "bytes_in": 10 ** 8, "bytes_out": 10 ** 8, "cpu_seconds": rng.uniform(1, 7),
                      "busy_seconds": 1.0} for stage in REPORT_STAGES}
    return {"elapsed_seconds": seconds, "stages": stages, "workers": [], "warnings": [],
            "epochs": series.to_json(), "timeline": {}}


def report_seconds() -> tuple[float, float] | None:
    """(wall, CPU) seconds of ``pagepipe report`` (reading, drawing, writing a PNG) for a 60-second run;
    None without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from stages.apps.report import write_report
    with tempfile.TemporaryDirectory(prefix="pagepipe-bench-report-") as scratch:
        stats = Path(scratch) / "run.json"
        stats.write_text(json.dumps(sixty_second_run()))
        wall, cpu = time.perf_counter(), time.process_time()
        write_report([stats], Path(scratch) / "report.png")
        return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench stats", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20000, help="epochs per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="measurements (medians are reported)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    console = Console()
    if args.epochs < MESSAGE_EVERY or args.repeat < 1:
        console.print(f"--epochs must be at least {MESSAGE_EVERY} and --repeat at least 1", markup=False)
        return 2
    stage = [record_cost(args.epochs) for _ in range(args.repeat)]
    transport = [transport_cost(args.epochs) for _ in range(args.repeat)]
    summary = [summary_cost(args.epochs) for _ in range(args.repeat)]
    figures = {
        "stage_us": statistics.median(stage) * 1e6,
        "worker_us": statistics.median(worker for worker, _ in transport) * 1e6,
        "supervisor_us": statistics.median(supervisor for _, supervisor in transport) * 1e6,
        "summary_us": statistics.median(summary) * 1e6,
    }
    figures["total_us"] = figures["stage_us"] + figures["worker_us"] + figures["supervisor_us"]
    console.print(f"per-epoch statistics, CPU per recorded epoch per stage (medians of {args.repeat} x "
                  f"{args.epochs} epochs):", markup=False)
    for key, label in (("stage_us", "in the stage: record_epoch + the runtime's bytes record"),
                       ("worker_us", "in the worker: take + encode the bus message"),
                       ("supervisor_us", "in the supervisor: decode + merge into the series"),
                       ("total_us", "together"),
                       ("summary_us", "summary at the end (distributions + JSON), once per run")):
        console.print(f"  {label:<58} {figures[key]:6.2f} us", markup=False)
    met = figures["total_us"] <= TARGET_US
    console.print(f"{'met' if met else 'MISSED'}: per-epoch statistics {figures['total_us']:.2f} us per epoch per "
                  f"stage (target <= {TARGET_US:g} us)", markup=False)
    report = report_seconds()
    if report is None:
        console.print("report of a 60 s run: not measured (matplotlib is missing: pip install 'pagepipe[plot]')",
                      markup=False)
    else:
        figures["report_wall_seconds"], figures["report_cpu_seconds"] = report
        met = report[0] < TARGET_REPORT_SECONDS
        console.print(f"{'met' if met else 'MISSED'}: report of a 60 s run (2400 epochs, 7 stages) {report[0]:.2f} s "
                      f"wall, {report[1]:.2f} s CPU (target < {TARGET_REPORT_SECONDS:g} s; the first report in a "
                      f"process also imports matplotlib)", markup=False)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
