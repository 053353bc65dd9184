"""``pagepipe demo``: a built-in workload replicated live, then checked byte for byte.

The demo process runs a workload in tracked memory and its ``region-src``
(the pause point is in this process); the sender stages (classify,
xor-delta+rle, entropy coding, framing, zmq-sink) and the receiver stages
(zmq-src, deframe, decode, replica-sink) each run in their own processes,
linked over tcp loopback with CurveZMQ, under throwaway keys made for the run
(``StreamKeys``). Acknowledgements come back on their own socket to
an ``AckListener`` here, attached to the tracker (whose ``max-unacked`` bounds
the epochs in flight), and measure checkpoint -> acknowledgement latency. At the end the last
checkpoint is waited for (output commit), the pipelines drain, and the replica
on disk is compared with the workload's memory.
"""
from __future__ import annotations

import argparse
import contextlib
import mmap
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from pipeline.bus import Message
from pipeline.cli import add_log_arguments, run_log
from pipeline.subcommand import Subcommand
from pipeline.errors import ConfigError, PagepipeError
from pipeline.pipeline import Pipeline
from pipeline.units import parse_duration, parse_size
from stages.common.acks import AckListener
from stages.classify import Classify
from stages.entropy import Decode, Lz4, Zstd
from stages.framer import Deframe, Frame
from stages.replica import ReplicaSink
from stages.common.replica_store import load_replica
from stages.common.security import StreamKeys
from stages.rle import RUN_FORMATS, RunLengthEncode
from stages.trackers.region import RegionSource, tracked_array
from stages.trackers.workload import make_workload
from stages.transport import ZmqSink, ZmqSource
from stages.xor_delta import XorDelta

_ENTROPY = {"zstd": Zstd, "lz4": Lz4}


@dataclass
class DemoOptions:
    """What ``pagepipe demo`` runs; the defaults are the embedded demo."""

    workload: str = "kv"
    size: int = 64 << 20
    seconds: float = 10.0
    rate: float = 40.0
    codec: str = "native+zstd"
    workers: int = 1
    replica: str | None = None
    fsync: bool = False
    max_unacked: int = 16
    steps: int = 16
    seed: int = 1


@dataclass
class DemoResult:
    """What the demo measured, and whether the replica equals the source."""

    identical: bool
    epochs: int
    seconds: float
    dirty_bytes: int
    wire_bytes: int
    pauses_ms: list[float]
    ack_latencies_ms: list[float]
    initial_sync_seconds: float = 0.0
    """Epoch 1 (every page) from checkpoint to acknowledgement, before the timed run."""
    warnings: list[str] = field(default_factory=list)
    statistics: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    """Final bus statistics per (stage, worker) of both pipelines."""

    @property
    def checkpoints_per_second(self) -> float:
        """Checkpoints of the timed run (after the initial full copy) per second."""
        return (self.epochs - 1) / self.seconds if self.seconds else 0.0

    @property
    def ratio(self) -> float:
        return self.dirty_bytes / self.wire_bytes if self.wire_bytes else 0.0

    @property
    def ack_latency_ms_median(self) -> float | None:
        return statistics.median(self.ack_latencies_ms) if self.ack_latencies_ms else None

    @property
    def ack_latency_ms_p90(self) -> float | None:
        if not self.ack_latencies_ms:
            return None
        return float(np.percentile(self.ack_latencies_ms, 90))


def free_tcp_endpoint() -> str:
    """A loopback endpoint whose port is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def sender_stages(source: RegionSource, options: DemoOptions, endpoint: str, keys: StreamKeys) -> list:
    """The sending pipeline: the tracker, then classify, xor-delta(+rle), entropy, frame, zmq-sink."""
    run_format, *entropy = options.codec.split("+")
    if run_format not in RUN_FORMATS or len(entropy) > 1 or any(e not in _ENTROPY for e in entropy):
        raise ConfigError(f"demo: codec {options.codec!r}: use one of {', '.join(RUN_FORMATS)}, "
                          f"optionally + {' or '.join(_ENTROPY)}")
    stages = [source, Classify(), XorDelta(cache=options.size, workers=options.workers),
              RunLengthEncode(format=run_format)]
    stages += [_ENTROPY[name](workers=options.workers) for name in entropy]
    return stages + [Frame(), ZmqSink(endpoint=endpoint, **keys.sender_sink())]


def receiver_stages(options: DemoOptions, endpoint: str, ack_endpoint: str, replica: str, keys: StreamKeys) -> list:
    """The receiving pipeline: zmq-src (binds), deframe (resume: a restarted receiver joins at the next
    resync segment), decode, replica-sink acknowledging to ``ack_endpoint``."""
    return [ZmqSource(endpoint=endpoint, bind=True, **keys.receiver_source()), Deframe(resume=True), Decode(),
            ReplicaSink(path=replica, fsync=options.fsync, ack_endpoint=ack_endpoint, **keys.receiver_acks())]


class Progress:
    """The latest bus statistics of every worker, and the warnings, as they arrive."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, int], dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.lock = threading.Lock()

    def on_message(self, message: Message) -> None:
        with self.lock:
            if message.kind == "stats":
                self.latest[(message.stage, message.worker)] = message.fields
            elif message.kind == "warning":
                self.warnings.append(str(message))

    def per_stage(self) -> dict[str, tuple[float | None, int, int]]:
        """Per stage: busy percentage of its busiest worker (None for sources, whose wait counts as busy),
        batches in and bytes in."""
        with self.lock:
            rows: dict[str, tuple[float | None, int, int]] = {}
            for (stage, _), stats in self.latest.items():
                elapsed = stats.get("elapsed_seconds") or 0
                source = not stats.get("batches_in")
                percent = None if source or not elapsed else 100.0 * stats.get("busy_seconds", 0) / elapsed
                old_percent, batches, nbytes = rows.get(stage, (None, 0, 0))
                if old_percent is not None and percent is not None:
                    percent = max(percent, old_percent)
                rows[stage] = (percent, batches + int(stats.get("batches_in", 0)),
                               nbytes + int(stats.get("bytes_in", 0)))
            return rows

    def stage_total(self, stage_prefix: str, key: str) -> int:
        """A statistic summed over the workers of the stages whose name starts with ``stage_prefix``."""
        with self.lock:
            return sum(int(stats.get(key, 0)) for (stage, _), stats in self.latest.items()
                       if stage.startswith(stage_prefix))


def progress_table(result: DemoResult, progress: Progress, elapsed: float, acked: int) -> Group:
    """The live table: epoch, acknowledged epoch, dirty and wire MB/s, ratio, pause, ack latency,
    then per stage its busy share and input."""
    table = Table(title=f"pagepipe demo - {elapsed:5.1f} s", show_header=True)
    for column in ("epoch", "acked", "dirty MB/s", "wire MB/s", "ratio", "pause ms", "ack ms"):
        table.add_column(column, justify="right")
    wire = progress.stage_total("frame", "bytes_out") or result.wire_bytes
    ratio = result.dirty_bytes / wire if wire else 0.0
    recent = result.ack_latencies_ms[-40:]
    table.add_row(str(result.epochs), str(acked), f"{result.dirty_bytes / elapsed / 1e6:.1f}",
                  f"{wire / elapsed / 1e6:.2f}", f"{ratio:.1f}",
                  f"{statistics.median(result.pauses_ms[-40:]):.2f}" if result.pauses_ms else "-",
                  f"{statistics.median(recent):.1f}" if recent else "-")
    busy = Table(title="stages", show_header=True)
    for column in ("stage", "busy %", "batches in", "MB in"):
        busy.add_column(column, justify="left" if column == "stage" else "right")
    for stage, (percent, batches, nbytes) in progress.per_stage().items():
        busy.add_row(stage, "-" if percent is None else f"{percent:.0f}", str(batches), f"{nbytes / 1e6:.1f}")
    return Group(table, busy)


def run_demo(options: DemoOptions, *, show_progress: bool = True,
             on_message: Callable[[Message], None] | None = None) -> DemoResult:
    """Run the demo end to end; the result says whether the replica equals the source.
    ``on_message`` also gets every bus message of both pipelines (a log, for example)."""
    if options.rate <= 0 or options.seconds <= 0:
        raise ConfigError("demo: rate and seconds must be positive")
    with tempfile.TemporaryDirectory(prefix="pagepipe-demo-") as scratch:
        replica = options.replica or f"{scratch}/replica"
        return _run(options, replica, show_progress, StreamKeys.create(f"{scratch}/keys"), on_message)


def _run(options: DemoOptions, replica: str, show_progress: bool, keys: StreamKeys,
         on_message: Callable[[Message], None] | None = None) -> DemoResult:
    memory = tracked_array(options.size, np.uint8)
    workload = make_workload(options.workload, memory, options.seed)
    source = RegionSource(regions=memory, max_unacked=options.max_unacked)
    progress = Progress()
    listen = progress.on_message
    if on_message is not None:
        def listen(message: Message) -> None:
            progress.on_message(message)
            on_message(message)
    data_endpoint = free_tcp_endpoint()
    listener = AckListener("tcp://127.0.0.1:*", **keys.sender_acks()).attach(source)
    result = DemoResult(False, 0, 0.0, 0, 0, [], [])
    checkpoint_times: dict[int, float] = {}   # epoch -> began, until its ack latency is recorded
    receiver = sender = None
    live = None
    try:
        sending = Pipeline.chain(*sender_stages(source, options, data_endpoint, keys))
        receiving = Pipeline.chain(*receiver_stages(options, data_endpoint, listener.endpoint, replica, keys))
        receiver = receiving.start(mode="process", on_message=listen, name="demo receiver")
        sender = sending.start(mode="process", on_message=listen, name="demo sender")
        synced = time.monotonic()
        _await_ack(listener, 1, (sender, receiver), or_resync=True)   # the receiver's start-up resync request
        _checkpoint(source, result, {})                  # epoch 1: the initial full copy, not timed
        _await_ack(listener, 1, (sender, receiver))
        result.initial_sync_seconds = time.monotonic() - synced
        if show_progress:
            live = Live(refresh_per_second=4, transient=False)
            live.start()
        period = 1.0 / options.rate
        began = time.monotonic()
        next_tick = began
        last_draw = 0.0
        while True:
            now = time.monotonic()
            if now - began >= options.seconds:
                break
            for _ in range(options.steps):
                workload.step()
            _checkpoint(source, result, checkpoint_times)
            if live is not None and now - last_draw > 0.25:
                last_draw = now
                _record_latencies(result, checkpoint_times, listener)
                live.update(progress_table(result, progress, max(now - began, 1e-3), listener.acked_epoch))
            next_tick = max(next_tick + period, time.monotonic())
            time.sleep(max(0.0, next_tick - time.monotonic()))
        while True:   # output commit: the last checkpoint is the replica's (a resync takes one more)
            _checkpoint(source, result, checkpoint_times)
            if _await_ack(listener, result.epochs, (sender, receiver), or_resync=True):
                break
        result.seconds = time.monotonic() - began
        source.close()
        sender_result = sender.wait(timeout=60)
        receiver_result = receiver.wait(timeout=60)
        _record_latencies(result, checkpoint_times, listener)
        result.statistics = {**sender_result.statistics, **receiver_result.statistics}
        result.wire_bytes = sum(int(stats.get("bytes_out", 0)) for (stage, _), stats in result.statistics.items()
                                if stage.startswith("frame"))
        result.identical = bool(np.array_equal(load_replica(replica)["region0"][:memory.size], memory))
        if live is not None:
            live.update(progress_table(result, progress, result.seconds, listener.acked_epoch))
    finally:
        if live is not None:
            live.stop()
        for handle in (sender, receiver):
            if handle is not None:
                handle.stop()
        listener.close()
        result.warnings = progress.warnings
    return result


def _await_ack(listener: AckListener, epoch: int, handles: tuple, timeout: float = 60.0,
               or_resync: bool = False) -> bool:
    """Wait for ``epoch``'s acknowledgement: True once it came, False if (``or_resync``) the receiver
    asked for a resync instead. Raises the failure of a pipeline that ended meanwhile."""
    deadline = time.monotonic() + timeout
    while not listener.wait_for(epoch, timeout=0.1, or_resync=or_resync):
        for handle in handles:
            if not handle.running:
                handle.wait(0)
                raise PagepipeError("demo: a pipeline ended before the last epoch was acknowledged")
        if time.monotonic() > deadline:
            raise PagepipeError(f"demo: epoch {epoch} not acknowledged within {timeout:g} s")
    return listener.acked_epoch >= epoch


def _checkpoint(source: RegionSource, result: DemoResult, times: dict[int, float]) -> None:
    began = time.monotonic()
    info = source.checkpoint()
    times[info.epoch] = began
    result.epochs = info.epoch
    result.dirty_bytes += info.pages * mmap.PAGESIZE
    result.pauses_ms.append(info.pause * 1e3)


def _record_latencies(result: DemoResult, times: dict[int, float], listener: AckListener) -> None:
    for epoch in sorted(listener.ack_times):
        if epoch in times:
            result.ack_latencies_ms.append((listener.ack_times[epoch] - times.pop(epoch)) * 1e3)


def print_summary(result: DemoResult, options: DemoOptions, console: Console) -> None:
    console.print()
    pauses = result.pauses_ms or [0.0]
    console.print(f"[bold]pagepipe demo[/bold]: workload {options.workload}, {options.size >> 20} MiB, "
                  f"codec {options.codec}, workers {options.workers}")
    console.print(f"  initial full copy (epoch 1) replicated in {result.initial_sync_seconds:.2f} s; then "
                  f"{result.epochs - 1} checkpoints in {result.seconds:.1f} s: "
                  f"{result.checkpoints_per_second:.1f}/s (target {options.rate:g}/s)")
    console.print(f"  dirty {result.dirty_bytes / 1e6:.1f} MB, wire {result.wire_bytes / 1e6:.2f} MB, "
                  f"compression ratio {result.ratio:.1f}")
    console.print(f"  pause median {statistics.median(pauses):.2f} ms, max {max(pauses):.2f} ms")
    if result.ack_latency_ms_median is not None:
        console.print(f"  checkpoint -> ack median {result.ack_latency_ms_median:.1f} ms, "
                      f"p90 {result.ack_latency_ms_p90:.1f} ms")
    for warning in result.warnings:
        console.print(f"  {warning}", style="yellow", markup=False, highlight=False)
    verdict = "[green]identical[/green]" if result.identical else "[red]DIFFERENT[/red]"
    console.print(f"  replica vs source, byte for byte: {verdict}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pagepipe demo``."""
    parser.add_argument("--workload", default="kv", help="built-in workload: kv, sim or log (default kv)")
    parser.add_argument("--size", default="64MiB", help="tracked memory (default 64MiB)")
    parser.add_argument("--seconds", default="10", help="duration (default 10 s)")
    parser.add_argument("--rate", type=float, default=40.0, help="checkpoints per second (default 40)")
    parser.add_argument("--codec", default="native+zstd", help="codec chain: native|xbzrle|xen[+zstd|+lz4]")
    parser.add_argument("--workers", type=int, default=1, help="workers of xor-delta and the entropy stage")
    parser.add_argument("--replica", default=None, help="keep the replica in this directory (default: temporary)")
    parser.add_argument("--fsync", action="store_true", help="fsync every commit at the replica")
    parser.add_argument("--max-unacked", type=int, default=16, help="epochs in flight before checkpoints wait (0 = unbounded)")
    parser.add_argument("--steps", type=int, default=16, help="workload steps between checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no live table, only the summary")
    add_log_arguments(parser)


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run the demo from parsed options: 0 only if the replica equals the source; ConfigError for bad options."""
    console = console or Console()
    options = DemoOptions(workload=args.workload, size=parse_size(args.size), seconds=parse_duration(args.seconds),
                          rate=args.rate, codec=args.codec, workers=args.workers, replica=args.replica,
                          fsync=args.fsync, max_unacked=args.max_unacked, steps=args.steps)
    log = run_log(args, console, [("frame0", "bytes_out")])
    with log or contextlib.nullcontext():
        result = run_demo(options, show_progress=not args.no_progress and console.is_terminal, on_message=log)
    print_summary(result, options, console)
    return 0 if result.identical else 1


COMMAND = Subcommand("replicate a built-in workload live, then compare replica and source byte for byte",
                     add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    """``pagepipe demo [options]`` (also ``python -m stages.apps.demo``)."""
    parser = argparse.ArgumentParser(prog="pagepipe demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ConfigError as exc:
        print(f"pagepipe demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
