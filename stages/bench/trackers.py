"""Tracker pause-time benchmark: how long each checkpoint stops the program.

``pagepipe bench trackers`` or ``python -m benchmarks.trackers``. Two figures,
each a median over checkpoints and also shown as a multiple of a plain memory
copy of the same bytes measured in the same run:

- region-src in userfaultfd mode on a 1 GiB region with 1% of its pages
  written between checkpoints (target: pause <= 3 ms), beside digest mode
  on the same region, whose pause grows with the region instead;
- process-src on a child process with about 100 MiB of written memory, 1% of
  it rewritten between checkpoints (target: pause <= 30 ms).

Downstream is a thread that drains the stream and drops the batches, as a
ZeroMQ link would. The memory copy is timed right after every checkpoint, so
both medians see the same load on a shared machine. Exit status: 0, 1 if a
target is missed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass

import numpy as np

from pipeline.batch import Flag
from pipeline.stage import StageContext
from stages.trackers.process import ProcessSource
from stages.trackers.region import PAGE_SIZE, RegionSource, tracked_array

MiB = 1 << 20


@dataclass
class PauseFigures:
    """Pauses of one tracker run and memory copies of the same bytes timed beside them, in seconds."""

    name: str
    pauses: list[float]
    copies: list[float]
    target: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.pauses)

    def line(self) -> str:
        copy = statistics.median(self.copies)
        verdict = "" if self.target is None else (
            f"  target <= {self.target * 1e3:.0f} ms: " + ("met" if self.median <= self.target else "MISSED"))
        return (f"{self.name}: median pause {self.median * 1e3:.2f} ms (max {max(self.pauses) * 1e3:.2f} ms, "
                f"{len(self.pauses)} checkpoints) = {self.median / copy:.1f} x memcpy of the same "
                f"bytes ({copy * 1e3:.2f} ms){verdict}")


class MemoryCopy:
    """Times np.copyto over a fixed number of bytes: the baseline, measured beside each checkpoint."""

    def __init__(self, nbytes: int):
        self.source = np.ones(nbytes, dtype=np.uint8)
        self.target = np.zeros(nbytes, dtype=np.uint8)
        self.seconds: list[float] = []

    def measure(self) -> None:
        began = time.perf_counter()
        np.copyto(self.target, self.source)
        self.seconds.append(time.perf_counter() - began)


def drain(source) -> threading.Thread:
    """Consume a source's stream in a thread, dropping batches."""
    thread = threading.Thread(target=collections.deque, args=(source.produce(), 0), daemon=True)
    thread.start()
    return thread


def region_pauses(region_bytes: int, dirty_fraction: float, checkpoints: int, mode: str,
                  seed: int = 0) -> tuple[list[float], list[float]]:
    """Pauses of ``checkpoints`` checkpoints after the initial full copy, each with that fraction of pages
    written; and the memory copies of the dirty bytes timed beside them."""
    memory = tracked_array((region_bytes // PAGE_SIZE, PAGE_SIZE))
    memory[:, 0] = 1  # populated, like memory a program uses
    dirty = max(1, int(len(memory) * dirty_fraction))
    baseline = MemoryCopy(dirty * PAGE_SIZE)
    source = RegionSource(regions=memory, mode=mode)
    source.start(StageContext("region-src"))
    consumer = drain(source)
    rng = np.random.default_rng(seed)
    pauses = []
    try:
        source.checkpoint()
        for _ in range(checkpoints):
            memory[rng.choice(len(memory), dirty, replace=False), 8] += 1
            time.sleep(0.01)  # let downstream drain, as the program's run time would
            pauses.append(source.checkpoint().pause)
            baseline.measure()
    finally:
        source.close()
        consumer.join()
        source.stop()
    return pauses, baseline.seconds


CHILD = textwrap.dedent("""
    import random, sys, time
    memory = bytearray(b"\\x01") * int(sys.argv[1])
    pages = len(memory) // 4096
    rng = random.Random(0)
    print("ready", flush=True)
    while True:
        for _ in range(max(1, pages // 100)):
            offset = rng.randrange(pages) * 4096 + 16
            memory[offset] = (memory[offset] + 1) & 0xFF
        time.sleep(0.025)
""")

def process_pauses(child_bytes: int, checkpoints: int, interval: float) -> tuple[list[float], list[float], int]:
    """Pauses of process-src over a child with ``child_bytes`` of written memory, memory copies of the
    tracked bytes timed beside them, and the bytes tracked."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(child_bytes)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None  # stdout=PIPE
    try:
        child.stdout.readline()
        source = ProcessSource(pid=child.pid, interval=interval, checkpoints=checkpoints + 1)
        source.start(StageContext("process-src"))
        pauses: list[float] = []
        baseline: MemoryCopy | None = None
        try:
            for batch in source.produce():
                if batch.flags & Flag.LAYOUT:
                    baseline = MemoryCopy(sum(r["npages"] for r in batch.meta["regions"]) * PAGE_SIZE)
                elif batch.flags & Flag.EPOCH_END and batch.epoch > 1:
                    pauses.append(batch.meta["pause_ms"] / 1e3)
                    if baseline is None:
                        raise RuntimeError("process-src sent an epoch before its layout")
                    baseline.measure()
        finally:
            source.stop()
        if baseline is None:
            raise RuntimeError("process-src sent no layout")
        return pauses, baseline.seconds, baseline.source.nbytes
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagepipe bench trackers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--region-size", type=int, default=1024, help="MiB tracked by region-src (default 1024)")
    parser.add_argument("--dirty", type=float, default=0.01, help="fraction of pages written per checkpoint")
    parser.add_argument("--process-size", type=int, default=100, help="MiB the child process writes (default 100)")
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints per measurement (default 20)")
    parser.add_argument("--digest-checkpoints", type=int, default=3, help="checkpoints in digest mode (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure and print the pause figures; 0 if every target is met, 1 if not, 2 on bad arguments."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if min(args.region_size, args.process_size, args.checkpoints, args.digest_checkpoints) < 1 \
            or not 0 < args.dirty <= 1:
        print("error: sizes and checkpoint counts must be at least 1, --dirty in (0, 1]", file=sys.stderr)
        return 2
    region_bytes = args.region_size * MiB
    print(f"tracker pause benchmark: page size {PAGE_SIZE}, medians over checkpoints")
    results = [
        PauseFigures(f"region-src uffd, {args.region_size} MiB, {args.dirty:.1%} dirty",
                     *region_pauses(region_bytes, args.dirty, args.checkpoints, "uffd"), target=3e-3),
        PauseFigures(f"region-src digest, {args.region_size} MiB, {args.dirty:.1%} dirty",
                     *region_pauses(region_bytes, args.dirty, args.digest_checkpoints, "digest")),
    ]
    pauses, copies, tracked = process_pauses(args.process_size * MiB, args.checkpoints, interval=0.025)
    results.append(PauseFigures(f"process-src, child of {args.process_size} MiB ({tracked / MiB:.0f} MiB tracked)",
                                pauses, copies, target=30e-3))
    for result in results:
        print(result.line())
    return 0 if all(r.target is None or r.median <= r.target for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
