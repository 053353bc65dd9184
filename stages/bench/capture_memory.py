"""Capture a trace of a live process's writable memory, for the codec benchmark.

``python -m benchmarks.capture_memory --spawn memcached --out /work/captures/mc.npz``
takes snapshots a fixed interval apart of every writable mapping of a process
that process-src tracks, while the process works. For each snapshot the
process is stopped (SIGSTOP, every thread), its mappings are read and it is
resumed (SIGCONT, always, also on error); finding and reading the mappings is
``stages.trackers.procmem``'s, the same as process-src's. The trace is saved
in the corpus layout (see ``benchmarks/realmemory.py``): ``base``,
``region_starts``, ``region_npages`` and, per later snapshot,
``epochNNN_pages``/``epochNNN_data`` with the pages that changed. The mappings
are those present at the first snapshot.

Targets: an existing process (``--pid``), Debian's memcached under a load
generator written here (``--spawn memcached``; sets, gets and increments over
127.0.0.1, bounded in count and time), or a Python interpreter churning dicts
and lists (``--spawn python``). Every process started here is stopped here.
Large captures belong in ../captures (outside the repo), never in git.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.console import Console

from pipeline.errors import ConfigError, PagepipeError, TrackerError, TransportError
from pipeline.units import format_size, parse_duration, parse_size
from stages.trackers.procmem import ProcessGone, read_pages, wait_stopped, writable_mappings

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_STOP_WAIT_SECONDS = 5.0
_VALUE_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"  # no uppercase: "END" in a reply ends a get
_VALUE_POOL_BYTES = 1 << 16  # values are slices of one random pool of this size
_MAX_REPLY_BYTES = 64 << 20


# ---- reading a stopped process (stages.trackers.procmem) ------------------------

@dataclass(frozen=True)
class Region:
    """A tracked mapping: virtual start address and length in pages."""

    start: int
    npages: int


def writable_regions(pid: int) -> list[Region]:
    """The writable mappings of ``pid`` that process-src tracks (heap, stacks, anonymous memory, .data)."""
    try:
        mappings = writable_mappings(pid)
    except ProcessGone:
        raise TrackerError(f"process {pid}: no such process") from None
    return [Region(mapping.start, (mapping.end - mapping.start) // PAGE_SIZE) for mapping in mappings]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Keep ``pid`` stopped (SIGSTOP) inside the block; it is resumed (SIGCONT) however the block ends.

    The block starts once every thread has stopped, so none writes while it is read.
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        raise TrackerError(f"process {pid}: no such process") from None
    try:
        wait_stopped(pid, _STOP_WAIT_SECONDS)
        yield
    except ProcessGone:
        raise TrackerError(f"process {pid}: exited during the capture") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def read_regions(pid: int, regions: list[Region], out: np.ndarray) -> int:
    """Read ``regions`` of a stopped ``pid`` into ``out`` (``(sum npages, PAGE_SIZE)`` uint8).

    Pages that cannot be read (unmapped since the layout was taken) read as
    zeros; returns how many there were.
    """
    first_rows = np.cumsum([0] + [region.npages for region in regions])
    runs = [(region.start, region.npages, int(row)) for region, row in zip(regions, first_rows) if region.npages]
    return len(read_pages(pid, runs, PAGE_SIZE, out))


def changed_pages(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Numbers (uint64) of the pages that differ between two snapshots of the same layout."""
    step = 4096  # pages per comparison, to keep the temporary small
    found = [np.flatnonzero((previous[i: i + step] != current[i: i + step]).any(axis=1)) + i
             for i in range(0, previous.shape[0], step)]
    return np.concatenate(found).astype(np.uint64) if found else np.empty(0, dtype=np.uint64)


# ---- a trace ---------------------------------------------------------------------

@dataclass
class Trace:
    """Snapshots of one process in the corpus layout."""

    regions: list[Region]
    base: np.ndarray
    epochs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (pages, data)
    unreadable_pages: int = 0

    def save(self, path: Path) -> None:
        """Write the .npz (compressed: real memory is mostly zeros)."""
        arrays: dict[str, Any] = {
            "base": self.base,
            "region_starts": np.array([r.start for r in self.regions], dtype=np.uint64),
            "region_npages": np.array([r.npages for r in self.regions], dtype=np.uint64),
        }
        for number, (pages, data) in enumerate(self.epochs):
            arrays[f"epoch{number:03d}_pages"] = pages
            arrays[f"epoch{number:03d}_data"] = data
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **arrays)
        except OSError as exc:
            raise TransportError(f"cannot write trace {path} ({exc})") from None


def capture(pid: int, *, snapshots: int, interval: float, max_bytes: int | None = None,
            console: Console | None = None) -> Trace:
    """Take ``snapshots`` snapshots of ``pid``, ``interval`` seconds of running time apart.

    The layout is read while the process is stopped for the first snapshot.
    A process with more writable memory than ``max_bytes`` raises
    TrackerError rather than being captured in part.
    """
    if snapshots < 2:
        raise ConfigError(f"snapshots: {snapshots}; at least 2 are needed for one epoch")
    with stopped(pid):
        regions = [r for r in writable_regions(pid) if r.npages > 0]
        npages = sum(r.npages for r in regions)
        if max_bytes is not None and npages * PAGE_SIZE > max_bytes:
            raise TrackerError(f"process {pid}: {format_size(npages * PAGE_SIZE)} of writable memory exceeds "
                               f"the limit {format_size(max_bytes)}")
        previous = np.empty((npages, PAGE_SIZE), dtype=np.uint8)
        unreadable = read_regions(pid, regions, previous)
    current = np.empty_like(previous)
    trace = Trace(regions, previous.copy(), unreadable_pages=unreadable)
    if console is not None:
        console.print(f"snapshot 0: {len(regions)} mappings, {format_size(previous.nbytes)}", highlight=False)
    for number in range(1, snapshots):
        time.sleep(interval)
        with stopped(pid):
            trace.unreadable_pages += read_regions(pid, regions, current)
        pages = changed_pages(previous, current)
        index = pages.astype(np.intp)
        trace.epochs.append((pages, current[index]))
        previous[index] = current[index]
        if console is not None:
            console.print(f"snapshot {number}/{snapshots - 1}: {pages.size} pages changed", highlight=False)
    return trace


# ---- workloads ---------------------------------------------------------------------

def churn_python_objects(seconds: float, keys: int = 200_000, seed: int = 1) -> None:
    """A Python workload: grows and rewrites a dict of ``keys`` keys and a list of small objects, for ``seconds``."""
    rng = random.Random(seed)
    table: dict[int, object] = {}
    history: list[object] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(1000):
            key = rng.randrange(keys)
            table[key] = (key, str(rng.random()), [key] * rng.randrange(1, 8))
            history.append(table.get(rng.randrange(keys)))
            if len(history) > keys // 2:
                del history[: keys // 4]


@dataclass(frozen=True)
class MemcachedLoad:
    """A load for memcached: fill ``keys`` keys, then churn them with Pareto-skewed popularity.

    Values are lowercase letters and digits, so ``END\\r\\n`` in a reply can
    only be the end of a get. Sizes are checked here, before anything starts.
    """

    port: int
    keys: int = 200_000
    value_bytes: tuple[int, int] = (16, 240)
    fill_value_bytes: int = 1000
    max_operations: int = 50_000_000
    max_seconds: float = 120.0
    commands_per_round: int = 200

    def __post_init__(self) -> None:
        sizes = (*self.value_bytes, self.fill_value_bytes)
        if not all(1 <= size < _VALUE_POOL_BYTES for size in sizes) or self.keys < 1:
            raise ConfigError(f"memcached load: value sizes {sizes} must be 1..{_VALUE_POOL_BYTES - 1} bytes "
                              f"and keys ({self.keys}) at least 1")


def run_memcached_load(load: MemcachedLoad, filled: "multiprocessing.synchronize.Event",
                       stop: "multiprocessing.synchronize.Event", seed: int = 1) -> None:
    """Fill every key once (then set ``filled``), then sets/gets/increments until ``stop`` or a bound is reached."""
    rng = random.Random(seed)
    values = bytes(rng.choice(_VALUE_ALPHABET) for _ in range(_VALUE_POOL_BYTES))
    deadline = time.monotonic() + load.max_seconds
    operations = 0
    with socket.create_connection(("127.0.0.1", load.port), timeout=10) as connection:
        for first in range(0, load.keys, load.commands_per_round):
            batch = b"".join(_set(f"k{key}", values, rng, load.fill_value_bytes, load.fill_value_bytes)
                             for key in range(first, min(first + load.commands_per_round, load.keys)))
            _round_trip(connection, batch + b"get k0\r\n")
            operations += load.commands_per_round
            if time.monotonic() > deadline or stop.is_set():
                break
        filled.set()
        low, high = load.value_bytes
        while not stop.is_set() and operations < load.max_operations and time.monotonic() < deadline:
            commands = []
            for _ in range(load.commands_per_round):
                key = min(int((rng.paretovariate(1.0) - 1) * load.keys / 1000), load.keys - 1)
                choice = rng.random()
                if choice < 0.5:
                    commands.append(_set(f"k{key}", values, rng, low, high))
                elif choice < 0.6:
                    commands.append(f"incr c{key % 1000} 1 noreply\r\nadd c{key % 1000} 0 0 1 noreply\r\n0\r\n".encode())
                else:
                    commands.append(f"get k{key}\r\n".encode())
            _round_trip(connection, b"".join(commands) + b"get k0\r\n")
            operations += load.commands_per_round


def _set(key: str, values: bytes, rng: random.Random, low: int, high: int) -> bytes:
    size = rng.randint(low, high)
    offset = rng.randrange(len(values) - size)
    return b"set %s 0 0 %d noreply\r\n%s\r\n" % (key.encode(), size, values[offset: offset + size])


def _round_trip(connection: socket.socket, commands: bytes) -> None:
    """Send a round of commands ending in a get and read every reply up to that get's END."""
    connection.sendall(commands)
    replies = bytearray()
    expected = commands.count(b"\r\nget ") + commands.startswith(b"get ")
    while replies.count(b"END\r\n") < expected:
        chunk = connection.recv(1 << 20)
        if not chunk:
            raise TransportError("memcached closed the connection")
        replies += chunk
        if len(replies) > _MAX_REPLY_BYTES:
            raise TransportError(f"memcached replied {len(replies)} bytes to one round, more than any reply can be")
        if b"ERROR" in replies:
            raise TransportError(f"memcached replied with an error: {bytes(replies[-200:])!r}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def spawned_python(seconds: float, keys: int = 200_000) -> Iterator[int]:
    """A Python interpreter churning objects (stops by itself after ``seconds``); yields its pid."""
    worker = multiprocessing.get_context("spawn").Process(target=churn_python_objects, args=(seconds, keys),
                                                          daemon=True)
    worker.start()
    assert worker.pid is not None  # started
    try:
        yield worker.pid
    finally:
        _stop_worker(worker)


@contextlib.contextmanager
def spawned_memcached(memory_mib: int, load: MemcachedLoad | None = None) -> Iterator[int]:
    """Debian's memcached on 127.0.0.1 (one thread) under a load filled before yielding; yields its pid."""
    binary = shutil.which("memcached")
    if binary is None:
        raise ConfigError("memcached is not installed (apt-get install -y memcached)")
    load = load or MemcachedLoad(port=free_port())
    server = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(load.port), "-U", "0", "-t", "1",
                               "-m", str(memory_mib), "-u", "nobody"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    context = multiprocessing.get_context("spawn")
    filled, stop = context.Event(), context.Event()
    client = context.Process(target=run_memcached_load, args=(load, filled, stop), daemon=True)
    try:
        _wait_for_port(server, load.port)
        client.start()
        while not filled.wait(0.2):
            if not client.is_alive():
                raise TransportError(f"memcached load generator exited early (code {client.exitcode})")
        yield server.pid
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)
        if client.pid is not None:
            _stop_worker(client)
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def _wait_for_port(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        if server.poll() is not None:
            raise TransportError(f"memcached exited (code {server.returncode}): {server.stderr.read().decode()[-300:] if server.stderr else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise TransportError(f"memcached did not listen on 127.0.0.1:{port} within 10 s")
        time.sleep(0.05)


def _stop_worker(worker: multiprocessing.process.BaseProcess) -> None:
    """End a workload process of ours: resume it if stopped, SIGTERM, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        if worker.pid is not None:
            os.kill(worker.pid, signal.SIGCONT)
    worker.terminate()
    worker.join(timeout=5)
    if worker.is_alive():
        worker.kill()
        worker.join()


# ---- command line --------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capture_memory", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="capture this running process")
    target.add_argument("--spawn", choices=("memcached", "python"), help="start this workload and capture it")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write (keep large ones out of the repo)")
    parser.add_argument("--snapshots", type=int, default=11, help="snapshots to take (epochs = snapshots - 1)")
    parser.add_argument("--interval", default="25ms", help="running time between snapshots (default 25ms)")
    parser.add_argument("--settle", default="2s",
                        help="running time of a spawned workload before the first snapshot (default 2s)")
    parser.add_argument("--max-memory", default="4GiB", help="refuse processes with more writable memory than this")
    parser.add_argument("--memcached-memory", type=int, default=512, help="memcached -m, in MiB (default 512)")
    parser.add_argument("--keys", type=int, default=300_000, help="memcached keys, each filled once before capture")
    parser.add_argument("--fill-value", default="1000", help="value size while filling memcached (default 1000 bytes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Capture and save a trace; 0 on success, 2 on bad arguments or a failed capture."""
    console = Console(stderr=True)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        interval, settle, max_bytes = (parse_duration(args.interval), parse_duration(args.settle),
                                       parse_size(args.max_memory))
        with contextlib.ExitStack() as stack:
            if args.spawn == "memcached":
                console.print(f"starting memcached -m {args.memcached_memory} and filling {args.keys} keys")
                load = MemcachedLoad(port=free_port(), keys=args.keys, fill_value_bytes=parse_size(args.fill_value),
                                     max_seconds=60 + settle + args.snapshots * (interval + 2))
                pid = stack.enter_context(spawned_memcached(args.memcached_memory, load))
            elif args.spawn == "python":
                pid = stack.enter_context(spawned_python(seconds=30 + settle + args.snapshots * (interval + 1)))
            else:
                pid = args.pid
            if args.spawn:
                time.sleep(settle)  # past start-up and filling, into steady work
            trace = capture(pid, snapshots=args.snapshots, interval=interval, max_bytes=max_bytes, console=console)
        trace.save(args.out)
    except PagepipeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    changed = sum(pages.size for pages, _ in trace.epochs)
    console.print(f"saved {args.out}: {len(trace.regions)} mappings, {format_size(trace.base.nbytes)} tracked, "
                  f"{len(trace.epochs)} epochs, {changed} changed pages"
                  + (f", {trace.unreadable_pages} unreadable pages read as zeros" if trace.unreadable_pages else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
