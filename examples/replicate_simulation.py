"""Replicate a numpy array that a simulation keeps updating.

A heat-diffusion simulation runs in a ``tracked_array``; a few times a second
the program calls ``checkpoint()`` (its pause point), and region-src hands the
pages written since the previous checkpoint to the sending pipeline:

    region-src ! classify ! xor-delta ! rle ! zstd ! frame ! zmq-sink

A receiving pipeline keeps the replica on disk:

    zmq-src ! deframe ! decode ! replica-sink path=DIR

The link is tcp loopback, so it runs CurveZMQ: the script makes a throwaway key
pair for each end (``StreamKeys``; between hosts, make them once with
``pagepipe keygen DIR`` and hand each end the other's public key). At the end
the replica is loaded with ``load_replica`` and compared with the array; the
exit status is 0 only if they are equal.

    python examples/replicate_simulation.py --checkpoints 40 --rate 20 --mode process
"""
from __future__ import annotations

import argparse
import mmap
import sys
import tempfile
import time

import numpy as np

from pipeline.errors import PagepipeError
from pipeline.pipeline import Pipeline
from stages.classify import Classify
from stages.apps.demo import free_tcp_endpoint
from stages.entropy import Zstd
from stages.framer import Frame
from stages.common.replica_store import load_replica
from stages.common.security import StreamKeys
from stages.rle import RunLengthEncode
from stages.trackers.region import RegionSource, tracked_array
from stages.transport import ZmqSink
from stages.xor_delta import XorDelta


class HeatDiffusion:
    """Explicit heat diffusion on a grid, heated at a point that wanders; updates the grid in place."""

    def __init__(self, grid: np.ndarray, seed: int = 0):
        self.grid = grid
        self.random = np.random.default_rng(seed)
        self.heater = np.array(grid.shape) // 2

    def step(self) -> None:
        g = self.grid
        laplacian = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
        g[1:-1, 1:-1] += 0.2 * laplacian
        self.heater = np.clip(self.heater + self.random.integers(-1, 2, size=2), 1, np.array(g.shape) - 2)
        g[tuple(self.heater)] += 100.0


def replicate(size: int, checkpoints: int, rate: float, steps: int, mode: str, replica: str,
              keys: StreamKeys) -> int:
    """Run the simulation with ``checkpoints`` checkpoints at ``rate`` per second; 0 if the replica equals it."""
    grid = tracked_array((size, size), np.float32)
    simulation = HeatDiffusion(grid)
    source = RegionSource(regions=grid)
    endpoint = free_tcp_endpoint()
    sender = Pipeline.chain(source, Classify(), XorDelta(), RunLengthEncode(format="native"), Zstd(), Frame(),
                            ZmqSink(endpoint=endpoint, **keys.sender_sink()))
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} {keys.words(keys.receiver_source())} ! deframe ! "
                              f"decode ! replica-sink path={replica} fsync=false")
    dirty_bytes = 0
    began = time.monotonic()
    with receiver.start(mode=mode) as receiving, sender.start(mode=mode) as sending:
        for tick in range(checkpoints):
            for _ in range(steps):
                simulation.step()
            dirty_bytes += source.checkpoint().pages * mmap.PAGESIZE
            if not receiving.running:
                receiving.wait(0)   # the receiver ended early: raise why (StageFailed), not the sender's timeout
            time.sleep(max(0.0, began + (tick + 1) / rate - time.monotonic()))
        source.close()   # ends the stream after the last checkpoint; both pipelines then drain and end
        while sending.running and receiving.running:
            time.sleep(0.05)
        receiving.wait(timeout=60)   # first: a receiver failure explains a sender's timeout
        sent = sending.wait(timeout=60)
    seconds = time.monotonic() - began
    wire_bytes = sent.totals("frame0").get("bytes_out", 0)
    identical = np.array_equal(load_replica(replica)["region0"][:grid.nbytes].view(np.float32), grid.ravel())
    print(f"{checkpoints} epochs in {seconds:.1f} s ({mode} mode, {source.tracking_mode} tracking), "
          f"grid {size}x{size} float32 = {grid.nbytes / 1e6:.2f} MB")
    print(f"dirty {dirty_bytes / 1e6:.2f} MB, wire {wire_bytes / 1e6:.3f} MB, "
          f"ratio {dirty_bytes / wire_bytes if wire_bytes else 0:.1f}")
    print(f"replica equals the array: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="grid side in cells (default 512: 1 MiB)")
    parser.add_argument("--checkpoints", type=int, default=40, help="checkpoints to take (default 40)")
    parser.add_argument("--rate", type=float, default=20.0, help="checkpoints per second (default 20)")
    parser.add_argument("--steps", type=int, default=5, help="simulation steps between checkpoints (default 5)")
    parser.add_argument("--mode", choices=("inline", "process"), default="process",
                        help="run the pipelines' stages in this process or one process per stage (default)")
    parser.add_argument("--replica", default=None, help="keep the replica in this directory (default: temporary)")
    args = parser.parse_args(argv)
    if args.size < 3 or args.checkpoints < 1 or args.rate <= 0 or args.steps < 0:
        parser.error("need --size >= 3, --checkpoints >= 1, --rate > 0, --steps >= 0")
    try:
        with tempfile.TemporaryDirectory(prefix="replicate-simulation-") as scratch:
            return replicate(args.size, args.checkpoints, args.rate, args.steps, args.mode,
                             args.replica or f"{scratch}/replica", StreamKeys.create(f"{scratch}/keys"))
    except PagepipeError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
