"""Tracker pause-time benchmark: how long each checkpoint stops the program.

``pagepipe bench trackers``. Figures are medians over checkpoints (p99 where
there are enough), each also shown as a multiple of a plain memory copy of
the dirty bytes timed right after every checkpoint, so both see the same load
on a shared machine. In one run, for each size of ``--sizes`` (default 100
MiB and 1 GiB), with ``--dirty`` (1%) of the pages written between checkpoints:

- region-src on a region of that size, uffd and digest modes;
- process-src on a child process holding that much written memory, mode=uffd
  (the kernel lists the written pages) and mode=digest (every page read and
  compared); the largest size in uffd mode runs ``--long-checkpoints`` (1000)
  steady-state checkpoints (the first, full one and those right after it
  that catch up with what the child wrote while the full one was handed on,
  more than twice the pages written per interval, are reported apart, the
  first with its arming stop and the pages its pause read: it is copied while
  the child runs);
- process-src uffd on the smallest child writing as many pages per
  checkpoint as the largest one: the pause should follow the dirty pages, not
  the size (the ratio of the two medians).

With ``--redis-seconds`` > 0 and redis-server installed: a live redis
(``--save '' --appendonly no --enable-debug-command yes``), ``DEBUG POPULATE
--redis-keys`` keys of ``--redis-value`` bytes, under ``redis-benchmark -t
set,incr -P 16`` load, replicated by process-src mode=uffd at
``--redis-interval`` (25 ms) for that long: checkpoints per second, pause
median and p99, share of time stopped, dirty MB/s, and the wire MB/s that
classify ! xor-delta ! rle ! zstd would send, from the ratio a process beside
the tracker reaches on the batches it can keep up with (the tracker is never
held back by it: it measures the tracker).

Targets (issue 8): process-src uffd 1 GiB at 1%: median <= 5 ms and p99 <= 10
ms; same dirty pages on the smallest vs the largest child: within 1.5x;
redis: >= 35 checkpoints/s and stopped <= 15%. Exit status: 0, 1 if a target
is missed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.batch import Flag
from pipeline.stage import StageContext
from stages.trackers.process import ProcessSource
from stages.trackers.region import PAGE_SIZE, RegionSource, tracked_array

MiB = 1 << 20


@dataclass
class PauseFigures:
    """Pauses of one tracker run and memory copies of the dirty bytes timed beside them, in seconds."""

    name: str
    pauses: list[float]
    copies: list[float]
    target: float | None = None
    target_p99: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.pauses)

    @property
    def p99(self) -> float:
        return float(np.percentile(self.pauses, 99))

    @property
    def met(self) -> bool:
        return (self.target is None or self.median <= self.target) and \
            (self.target_p99 is None or self.p99 <= self.target_p99)

    def line(self) -> str:
        copy = statistics.median(self.copies)
        verdict = ""
        if self.target is not None:
            verdict = f"  target median <= {self.target * 1e3:.0f} ms"
            if self.target_p99 is not None:
                verdict += f", p99 <= {self.target_p99 * 1e3:.0f} ms"
            verdict += ": " + ("met" if self.met else "MISSED")
        return (f"{self.name}: median pause {self.median * 1e3:.2f} ms (p99 {self.p99 * 1e3:.2f} ms, max "
                f"{max(self.pauses) * 1e3:.2f} ms, {len(self.pauses)} checkpoints) = {self.median / copy:.1f} x "
                f"memcpy of the dirty bytes ({copy * 1e3:.3f} ms){verdict}")


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
    dirty = int(sys.argv[2])
    rng = random.Random(0)
    print("ready", flush=True)
    while True:
        for _ in range(dirty):
            offset = rng.randrange(pages) * 4096 + 16
            memory[offset] = (memory[offset] + 1) & 0xFF
        time.sleep(0.025)
""")


WARMUP = 100
"""At most this many checkpoints after the first, full one are not counted as steady state: those that catch
up with what the child wrote while the full checkpoint's pages were handed downstream (more than twice the
pages written per interval); reported apart."""


def process_pauses(child_bytes: int, checkpoints: int, interval: float, mode: str = "uffd",
                   dirty_pages: int | None = None, warmup: int = 0) -> tuple[list[float], list[float], int]:
    """Pauses of process-src (``mode``) over a child with ``child_bytes`` of written memory that rewrites
    ``dirty_pages`` random pages (default 1%) every 25 ms; memory copies of the dirty bytes timed beside
    them; and the bytes tracked. The first (full) checkpoint and ``warmup`` more are not counted (the
    longest of those is printed)."""
    dirty = dirty_pages if dirty_pages is not None else max(1, child_bytes // PAGE_SIZE // 100)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(child_bytes), str(dirty)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    try:
        child.stdout.readline()
        source = ProcessSource(pid=child.pid, interval=interval, mode=mode)
        source.start(StageContext("process-src"))
        pauses: list[float] = []
        warm: list[float] = []
        baseline = MemoryCopy(dirty * PAGE_SIZE)
        tracked = 0
        first: dict = {}
        try:
            for batch in source.produce():
                if batch.flags & Flag.LAYOUT:
                    tracked = sum(r["npages"] for r in batch.meta["regions"]) * PAGE_SIZE
                elif not batch.flags & Flag.EPOCH_END:
                    continue
                elif batch.epoch == 1 or (len(warm) <= warmup and not pauses and batch.meta["pages"] > 2 * dirty):
                    warm.append(batch.meta["pause_ms"])
                    if batch.epoch == 1:
                        first = dict(source.counters)
                elif len(pauses) < checkpoints:
                    pauses.append(batch.meta["pause_ms"] / 1e3)
                    baseline.measure()
                    if len(pauses) == checkpoints:
                        source.close()
        finally:
            source.stop()
        if warmup:
            catching_up = f"longest {max(warm[1:]):.1f} ms" if len(warm) > 1 else "none"
            live = (f" (copied live: arming stop {first['arming_pause_ms']:.0f} ms, then the pause read "
                    f"{first['pause_read_pages']} of the {first['checkpoint_pages']} pages it sent)"
                    if "arming_pause_ms" in first else "")
            print(f"  (process-src {mode}, {child_bytes / MiB:.0f} MiB: first, full checkpoint {warm[0]:.1f} ms"
                  f"{live}; {len(warm) - 1} catching-up checkpoints after it, not counted: {catching_up})")
        return pauses, baseline.seconds, tracked
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


@dataclass
class RedisFigures:
    """A live redis replicated for a while: the schedule achieved and what it cost."""

    seconds: float
    pauses: list[float] = field(default_factory=list)
    dirty_bytes: int = 0
    encoded_in: int = 0  # page bytes the encoder thread took (it skips batches while it is behind)
    encoded_out: int = 0
    first_pause: float = 0.0
    stopped_fraction: float = 0.0
    resident_bytes: int = 0
    load_requests: int = 0

    def lines(self) -> list[str]:
        rate = len(self.pauses) / self.seconds
        p50, p99 = (float(np.percentile(self.pauses, q)) * 1e3 for q in (50, 99))
        return [
            f"redis ({self.resident_bytes / MiB:.0f} MiB resident) under redis-benchmark load, process-src uffd: "
            f"{rate:.1f} checkpoints/s over {self.seconds:.0f} s (target >= 35: {'met' if rate >= 35 else 'MISSED'})",
            f"redis pause: median {p50:.2f} ms, p99 {p99:.2f} ms, max {max(self.pauses) * 1e3:.2f} ms "
            f"(first, full checkpoint {self.first_pause * 1e3:.0f} ms, counted apart)",
            f"redis stopped {self.stopped_fraction:.1%} of the time (target <= 15%: "
            f"{'met' if self.stopped_fraction <= 0.15 else 'MISSED'}); dirty {self.dirty_bytes / MiB / self.seconds:.1f}"
            f" MB/s, wire about {self.wire_rate / MiB:.1f} MB/s (classify ! xor-delta ! rle ! zstd ratio "
            f"{self.ratio:.1f} over the {self.encoded_in / max(1, self.dirty_bytes):.0%} of the pages a process beside "
            f"could encode; skipped batches make later deltas staler, so the ratio errs low)",
        ]

    @property
    def ratio(self) -> float:
        return self.encoded_in / self.encoded_out if self.encoded_out else 0.0

    @property
    def wire_rate(self) -> float:
        return self.dirty_bytes / self.seconds / self.ratio if self.ratio else 0.0

    @property
    def met(self) -> bool:
        return len(self.pauses) / self.seconds >= 35 and self.stopped_fraction <= 0.15


def _die_with_us() -> None:
    """In a child before exec: SIGKILL it when this process dies, however it dies (PR_SET_PDEATHSIG)."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _redis_cli(port: int, *words: str, timeout: float = 600) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *words], capture_output=True, text=True, check=True,
                          timeout=timeout).stdout.strip()


def start_redis(keys: int, value: int) -> tuple[subprocess.Popen, int]:
    """A redis-server on a free loopback port, populated with ``keys`` keys of ``value`` bytes."""
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--enable-debug-command", "yes"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=_die_with_us)
    deadline = time.monotonic() + 30
    while True:
        try:
            if _redis_cli(port, "ping", timeout=5) == "PONG":
                break
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    _redis_cli(port, "DEBUG", "POPULATE", str(keys), "key", str(value))
    return server, port


def redis_load(port: int, value: int, key_space: int = 1_000_000) -> subprocess.Popen:
    """redis-benchmark writing ``value``-byte SETs and INCRs over ``key_space`` random keys until killed; the
    data set grows until every key exists (about ``key_space`` x ``value`` bytes)."""
    return subprocess.Popen(["redis-benchmark", "-p", str(port), "-t", "set,incr", "-r", str(key_space), "-d",
                             str(value), "-P", "16", "-n", "100000000", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_us)


def _encode(batches, results) -> None:
    """In its own process: classify ! xor-delta ! rle ! zstd over the batches it is handed; puts back the page
    bytes in and the payload bytes out."""
    os.nice(19)  # only spare CPU: the tracker and the server are what is measured
    from stages.bench.sender import direct_chain
    stages = direct_chain("native+zstd", "256MiB")
    encoded_in = encoded_out = 0
    while (batch := batches.get()) is not None:
        outputs = [batch]
        for stage in stages:
            outputs = [out for item in outputs for out in stage.handle(item)]
        if batch.data is not None:
            encoded_in += batch.data.nbytes
            encoded_out += sum(int(out.payload.shape[0]) for out in outputs
                               if out.payload is not None and not out.is_control)
    results.put((encoded_in, encoded_out))


def redis_run(keys: int, value: int, seconds: float, interval: float) -> RedisFigures:
    """Replicate a loaded redis for ``seconds`` after its first checkpoint (see the module docstring)."""
    server, port = start_redis(keys, value)
    load = None
    try:
        with open(f"/proc/{server.pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024
        load = redis_load(port, value)
        time.sleep(1.0)  # the load under way
        figures = RedisFigures(seconds, resident_bytes=rss)
        source = ProcessSource(pid=server.pid, interval=interval, mode="uffd")
        source.start(StageContext("process-src"))
        # The encoder runs in a process of its own: a busy thread here would hold the GIL the tracker's
        # ptrace thread needs at every request, and the pauses would measure that instead.
        context = multiprocessing.get_context("spawn")
        batches = context.Queue(maxsize=64)
        results = context.Queue()
        encoder = context.Process(target=_encode, args=(batches, results), daemon=True)
        encoder.start()
        began: float | None = None  # from the end of the first, full checkpoint
        stopped = 0.0
        try:
            for batch in source.produce():
                if batch.data is not None and began is not None:
                    figures.dirty_bytes += batch.data.nbytes
                try:  # the tracker is measured, not the encoder: a busy encoder skips batches
                    batches.put_nowait(batch)
                except queue.Full:
                    pass
                if not batch.flags & Flag.EPOCH_END:
                    continue
                pause = batch.meta["pause_ms"] / 1e3
                if batch.epoch == 1:
                    figures.first_pause = pause
                    began = time.monotonic()
                    continue
                figures.pauses.append(pause)
                stopped += pause
                if began is not None and time.monotonic() - began >= seconds:
                    source.close()
        finally:
            source.stop()
            batches.put(None)
            figures.encoded_in, figures.encoded_out = results.get(timeout=600)
            encoder.join()
        figures.seconds = time.monotonic() - (began or time.monotonic())
        figures.stopped_fraction = stopped / figures.seconds
        return figures
    finally:
        for process in (load, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagepipe bench trackers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1024", help="MiB of the regions and children (default 100,1024)")
    parser.add_argument("--dirty", type=float, default=0.01, help="fraction of pages written per checkpoint")
    parser.add_argument("--checkpoints", type=int, default=50, help="checkpoints per measurement (default 50)")
    parser.add_argument("--long-checkpoints", type=int, default=1000,
                        help="process-src uffd checkpoints on the largest child (default 1000)")
    parser.add_argument("--digest-checkpoints", type=int, default=3, help="checkpoints in digest mode (default 3)")
    parser.add_argument("--redis-seconds", type=float, default=0,
                        help="seconds of live redis replication (default 0: skipped; the issue's run is 120)")
    parser.add_argument("--redis-keys", type=int, default=1000000, help="keys DEBUG POPULATE makes (1000000)")
    parser.add_argument("--redis-value", type=int, default=1024, help="bytes per value (1024)")
    parser.add_argument("--redis-interval", type=float, default=0.025, help="seconds between checkpoints (0.025)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure and print the pause figures; 0 if every target is met, 1 if not, 2 on bad arguments."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        sizes = sorted({int(part) for part in args.sizes.split(",") if part})
    except ValueError:
        print(f"error: --sizes {args.sizes!r}: MiB separated by commas", file=sys.stderr)
        return 2
    if not sizes or min(sizes + [args.checkpoints, args.long_checkpoints, args.digest_checkpoints]) < 1 \
            or not 0 < args.dirty <= 1 or args.redis_seconds < 0:
        print("error: sizes and checkpoint counts must be at least 1, --dirty in (0, 1]", file=sys.stderr)
        return 2
    print(f"tracker pause benchmark: page size {PAGE_SIZE}, {args.dirty:.1%} of the pages written per checkpoint")
    results: list[PauseFigures] = []
    for size in sizes:
        largest = size == sizes[-1]
        nbytes = size * MiB
        label = f"{size} MiB, {args.dirty:.1%} dirty"
        results.append(PauseFigures(f"region-src uffd, {label}", *region_pauses(nbytes, args.dirty, args.checkpoints,
                                                                                "uffd")))
        results.append(PauseFigures(f"region-src digest, {label}",
                                    *region_pauses(nbytes, args.dirty, args.digest_checkpoints, "digest")))
        dirty = max(1, int(nbytes // PAGE_SIZE * args.dirty))
        count = args.long_checkpoints if largest else args.checkpoints
        pauses, copies, tracked = process_pauses(nbytes, count, 0.025, "uffd", dirty, WARMUP)
        results.append(PauseFigures(f"process-src uffd, child of {label} ({tracked / MiB:.0f} MiB tracked)",
                                    pauses, copies, *((5e-3, 10e-3) if largest and size >= 1024 else ())))
        pauses, copies, tracked = process_pauses(nbytes, args.digest_checkpoints, 0.025, "digest", dirty)
        results.append(PauseFigures(f"process-src digest, child of {label} ({tracked / MiB:.0f} MiB tracked)",
                                    pauses, copies))
        for result in results[-4:]:
            print(result.line(), flush=True)
    met = all(result.met for result in results)
    if len(sizes) > 1:
        large = results[-2]
        dirty = max(1, int(sizes[-1] * MiB // PAGE_SIZE * args.dirty))
        same = PauseFigures(f"process-src uffd, child of {sizes[0]} MiB writing {dirty} pages (as the "
                            f"{sizes[-1]} MiB one)", *process_pauses(sizes[0] * MiB, args.checkpoints, 0.025, "uffd",
                                                                      dirty, WARMUP)[:2])
        print(same.line())
        ratio = max(large.median, same.median) / min(large.median, same.median)
        verdict = "met" if ratio <= 1.5 else "MISSED"
        print(f"pause at the same dirty pages, {sizes[-1]} MiB vs {sizes[0]} MiB child: {ratio:.2f} x "
              f"(target within 1.5 x: {verdict})")
        met = met and ratio <= 1.5
    if args.redis_seconds > 0:
        if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
            print("redis: skipped (redis-server / redis-benchmark not installed: apt-get install redis-server "
                  "redis-tools)")
        else:
            redis = redis_run(args.redis_keys, args.redis_value, args.redis_seconds, args.redis_interval)
            for line in redis.lines():
                print(line)
            met = met and redis.met
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
