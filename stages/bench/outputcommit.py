"""Output commit benchmark: how long output waits between being produced and being released.

The output-commit pattern (README, "Output commit") releases what a program
produced only once the checkpoint holding the state that produced it is
acknowledged by the replica::

    produce(output)                  # the state changes, the output is held back
    source.checkpoint(wait=True)     # pause, copy, send; returns when the replica committed it
    release(output)                  # now it may leave: the backup can never take it back

``pagepipe bench outputcommit`` runs a sender (``region-src ! classify !
xor-delta ! rle ! zstd ! frame ! zmq-sink``) and a receiver (``zmq-src !
deframe ! decode ! replica-sink ack-endpoint=...``) in process mode over tcp
loopback; the program dirties ``--dirty`` of ``--size`` bytes and checkpoints
``--rate`` times a second for ``--seconds``, timing produced -> released for
every checkpoint after the initial full copy. It runs with the replica's
default ``fsync=true`` and ``settle=idle`` (the target: median <= 15 ms at 40
checkpoints/s), with ``settle=commit`` (every flush before the acknowledgement),
and, as the same-run baseline, with ``fsync=false``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

from pipeline.errors import ConfigError
from pipeline.pipeline import Pipeline
from pipeline.units import parse_size
from stages.apps.demo import free_tcp_endpoint
from stages.classify import Classify
from stages.common.acks import AckListener
from stages.entropy import Zstd
from stages.framer import Frame
from stages.rle import RunLengthEncode
from stages.trackers.region import PAGE_SIZE, RegionSource, tracked_array
from stages.transport import ZmqSink
from stages.xor_delta import XorDelta

TARGET_MS = 15.0
WARMUP = 5   # checkpoints left out: the first carries every page


def release_latencies(size: int, dirty: float, rate: float, seconds: float, fsync: bool, mode: str,
                      settle: str = "idle") -> list[float]:
    """Seconds from output produced to output released, per checkpoint (warm-up left out)."""
    memory = tracked_array(size, np.uint8)
    npages = size // PAGE_SIZE
    rng = np.random.default_rng(1)
    source = RegionSource(regions={"memory": memory})
    stream = free_tcp_endpoint()
    with tempfile.TemporaryDirectory(prefix="bench-outputcommit-") as replica:
        listener = AckListener("tcp://127.0.0.1:*", insecure=True).attach(source)   # loopback: no keys
        receiver = Pipeline.parse(f"zmq-src endpoint={stream} insecure=true ! deframe ! decode ! replica-sink "
                                  f"path={replica} fsync={str(fsync).lower()} settle={settle} ack-endpoint={listener.endpoint} "
                                  f"insecure=true")
        sender = Pipeline.chain(source, Classify(), XorDelta(), RunLengthEncode(), Zstd(), Frame(),
                                ZmqSink(endpoint=stream, insecure=True))
        latencies = []
        try:
            with receiver.start(mode=mode) as receiving, sender.start(mode=mode):
                count = max(WARMUP + 1, int(seconds * rate) + WARMUP)
                began = time.monotonic()
                for index in range(count):
                    pages = rng.choice(npages, max(1, int(npages * dirty)), replace=False)
                    memory[pages * PAGE_SIZE] += 1                 # the program works...
                    produced = time.perf_counter()                 # ...and holds its output back
                    source.checkpoint(wait=True)
                    released = time.perf_counter()                 # the output may leave now
                    if index >= WARMUP:
                        latencies.append(released - produced)
                    if not receiving.running:
                        receiving.wait(0)
                    time.sleep(max(0.0, began + (index + 1) / rate - time.monotonic()))
                source.close()
        finally:
            listener.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench outputcommit", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64MiB", help="tracked memory (default 64MiB, as the demo)")
    parser.add_argument("--dirty", type=float, default=0.01, help="share of pages written per checkpoint (0.01)")
    parser.add_argument("--rate", type=float, default=40.0, help="checkpoints per second (default 40)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--mode", choices=("process", "inline"), default="process")
    try:
        args = parser.parse_args(argv)
        size = parse_size(args.size) // PAGE_SIZE * PAGE_SIZE
    except (SystemExit, ConfigError, ValueError):
        return 2
    if size <= 0 or not 0 < args.dirty <= 1 or args.rate <= 0 or args.seconds <= 0:
        return 2
    medians = {}
    runs = (("true", "idle", " (the default)"), ("true", "commit", " (every flush before the ack)"),
            ("false", "idle", " (baseline)"))
    for fsync, settle, what in runs:
        latencies = release_latencies(size, args.dirty, args.rate, args.seconds, fsync == "true", args.mode, settle)
        medians[fsync, settle] = median = statistics.median(latencies) * 1e3
        p90 = float(np.percentile(latencies, 90)) * 1e3
        verdict = f"; target median <= {TARGET_MS:g} ms: {'met' if median <= TARGET_MS else 'MISSED'}" \
            if (fsync, settle) == ("true", "idle") else ""
        print(f"  fsync={fsync:5} settle={settle:6} produced -> released median {median:.1f} ms, p90 {p90:.1f} ms "
              f"over {len(latencies)} checkpoints at {args.rate:g}/s, {args.dirty:.1%} of {size / 2**20:.0f} MiB "
              f"dirty{what}{verdict}")
    print(f"  the cost of durability: {medians['true', 'idle'] - medians['false', 'idle']:.1f} ms per checkpoint "
          f"({medians['true', 'commit'] - medians['false', 'idle']:.1f} ms with settle=commit)")
    return 0 if medians["true", "idle"] <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
