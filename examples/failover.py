"""Fail over: the primary is killed, the backup notices, resumes the program from its replica and finishes.

A deterministic simulation (heat diffusion on a grid, one output line per
step) runs as the *primary*, in a child process, replicating its memory with
``region-src`` at ``--rate`` checkpoints a second to this process, the
*backup*:

    primary: region-src ! classify ! xor-delta ! rle ! zstd ! frame ! zmq-sink      (heartbeats every 100 ms)
    backup:  zmq-src failover=true ! deframe ! decode ! replica-sink ack-endpoint=... on-failover=CMD

Output commit: the primary writes each step's output into its tracked memory
(the outbox), calls ``checkpoint(wait=True)`` and only then releases the output
(appends it to the output file): no released line is ever taken back, since
the replica holds the state that produced it. At a random moment the backup
SIGKILLs the primary. ``zmq-src`` hears no heartbeat for ``failover-after``
(1 s), replica-sink makes the replica durable, runs the on-failover command and
posts a ``failover`` bus message; the backup then calls
``resume_from_replica``, releases the outputs the primary had produced but not
released (the output file, like a TCP peer's sequence numbers, says how far
it got), replicates the resumed arrays again and finishes the run. Checks: the
output and the final grid equal an uninterrupted run's; every line the primary
released is covered by the replica's checkpoint; none is repeated.

    python examples/failover.py --steps 120 --rate 30 --seed 7
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import PagepipeError
from pipeline.pipeline import Pipeline
from stages.basic import NullSink
from stages.classify import Classify
from stages.common.acks import AckListener
from stages.entropy import Decode, Zstd
from stages.framer import Deframe, Frame
from stages.replica import ReplicaSink
from stages.replica_store import resume_from_replica
from stages.rle import RunLengthEncode
from stages.trackers.region import RegionSource, tracked_array
from stages.transport import ZmqSink, ZmqSource
from stages.xor_delta import XorDelta

STEP, PRODUCED = 0, 1   # the meta array: steps done, outputs produced (the outbox's fill)


# ---- the program ------------------------------------------------------------------------------------------

def new_state(size: int, steps: int, allocate=np.zeros) -> dict[str, np.ndarray]:
    """The program's whole state: the grid, two counters and the outbox of output values (whole pages each,
    so that region-src can track them with userfaultfd)."""
    return {"grid": allocate((size, size), np.float64), "meta": allocate(512, np.int64),
            "outbox": allocate(-(-steps // 512) * 512, np.int64)}


def step(state: dict[str, np.ndarray]) -> None:
    """One deterministic step: diffuse, heat one cell, and put the grid's checksum in the outbox."""
    grid, meta = state["grid"], state["meta"]
    n, s = grid.shape[0], int(meta[STEP])
    laplacian = grid[:-2, 1:-1] + grid[2:, 1:-1] + grid[1:-1, :-2] + grid[1:-1, 2:] - 4 * grid[1:-1, 1:-1]
    grid[1:-1, 1:-1] += 0.2 * laplacian
    grid[1 + s * 7919 % (n - 2), 1 + s * 104729 % (n - 2)] += 100.0
    state["outbox"][meta[PRODUCED]] = zlib.crc32(grid.tobytes())
    meta[PRODUCED] += 1
    meta[STEP] += 1


def release(out, state: dict[str, np.ndarray], start: int) -> int:
    """Release outputs ``start`` .. produced (one line each, ``seq value``); returns the new released count."""
    produced = int(state["meta"][PRODUCED])
    for seq in range(start, produced):
        out.write(f"{seq} {int(state['outbox'][seq])}\n")
    out.flush()
    return produced


def released_lines(path: Path) -> list[str]:
    """The complete lines of the output file (a line cut short by the kill was never released)."""
    text = path.read_text() if path.exists() else ""
    return text[:text.rfind("\n") + 1].splitlines()


# ---- the primary (a child process) ------------------------------------------------------------------------

def primary(args: argparse.Namespace) -> int:
    state = new_state(args.size, args.steps, allocate=tracked_array)
    source = RegionSource(regions=state)
    listener = AckListener(args.ack, bind=False).attach(source)
    sender = Pipeline.chain(source, Classify(), XorDelta(), RunLengthEncode(), Zstd(), Frame(),
                            ZmqSink(endpoint=args.stream))
    latencies = []
    with sender.start(mode="inline"), open(args.out, "a") as out:
        released, began = 0, time.monotonic()
        while state["meta"][STEP] < args.steps:
            produced_at = time.perf_counter()
            step(state)
            source.checkpoint(wait=True)            # output commit: the backup has this state now...
            released = release(out, state, released)  # ...so its output may leave
            latencies.append(time.perf_counter() - produced_at)
            time.sleep(max(0.0, began + int(state["meta"][STEP]) / args.rate - time.monotonic()))
        source.close()
    listener.close()
    print(f"primary finished uninterrupted; output released {statistics.median(latencies) * 1e3:.1f} ms "
          f"(median) after it was produced")
    return 0


# ---- the backup (this process) ----------------------------------------------------------------------------

def uninterrupted(size: int, steps: int) -> tuple[list[str], int]:
    state = new_state(size, steps)
    lines = []
    for seq in range(steps):
        step(state)
        lines.append(f"{seq} {int(state['outbox'][seq])}")
    return lines, zlib.crc32(state["grid"].tobytes())


def backup(args: argparse.Namespace, scratch: Path) -> int:
    expected, expected_grid = uninterrupted(args.size, args.steps)
    chooser = random.Random(args.seed)
    kill_after = chooser.randint(max(1, args.steps // 5), max(1, args.steps // 2))   # outputs released first
    replica, out, marker = scratch / "replica", scratch / "output.txt", scratch / "on-failover.txt"
    stream, ack = f"ipc://{scratch}/stream", f"ipc://{scratch}/acks"   # Unix sockets: no keys needed
    receiver = Pipeline.chain(
        ZmqSource(endpoint=stream, failover=True), Deframe(), Decode(),
        ReplicaSink(path=str(replica), ack_endpoint=ack, ack_bind=True,
                    on_failover=f'echo "$PAGEPIPE_EPOCH $PAGEPIPE_REPLICA" > {marker}'))
    with receiver.start(mode="inline") as receiving:
        child = subprocess.Popen([sys.executable, __file__, "--role", "primary", "--stream", stream, "--ack", ack,
                                  "--out", str(out), "--steps", str(args.steps), "--rate", str(args.rate),
                                  "--size", str(args.size)])
        try:
            while len(released_lines(out)) < kill_after and child.poll() is None:
                time.sleep(0.002)
            time.sleep(chooser.uniform(0, 1.0 / args.rate))   # anywhere inside a checkpoint period
            child.send_signal(signal.SIGKILL)
            killed = time.time()
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        if child.returncode != -signal.SIGKILL:
            print(f"the primary ended (exit {child.returncode}) before it could be killed", file=sys.stderr)
            return 1
        failover = next((m for m in receiving.messages() if m.kind == "failover"), None)
        detected = time.time()
        receiving.stop()
    if failover is None:
        print("the backup never failed over", file=sys.stderr)
        return 1
    by_primary = released_lines(out)
    out.write_text("".join(line + "\n" for line in by_primary))   # drop a line the kill cut short
    print(f"primary SIGKILLed after releasing {len(by_primary)} outputs; failure detected "
          f"{detected - failover.fields['last_heard']:.2f} s after its last heartbeat "
          f"({detected - killed:.2f} s after the kill), replica at epoch {failover.fields['epoch']}")

    began = time.perf_counter()
    state = resume_from_replica(replica)
    resumed_in = time.perf_counter() - began
    produced = int(state["meta"][PRODUCED])
    print(f"resumed from the replica in {resumed_in * 1e3:.1f} ms: step {int(state['meta'][STEP])}, "
          f"{produced} outputs produced")
    covered = len(by_primary) <= produced and by_primary == expected[:len(by_primary)]
    source = RegionSource(regions=state)       # the resumed program replicates again (here: to nowhere)
    with Pipeline.chain(source, Frame(), NullSink()).start(mode="inline") as replicating, open(out, "a") as sink:
        first = source.checkpoint()
        released = release(sink, state, len(by_primary))   # produced by the primary, not released by it
        while state["meta"][STEP] < args.steps:
            step(state)
            source.checkpoint()
            released = release(sink, state, released)
        source.close()
        replicating.wait(timeout=60)
    every_page = first.pages == sum(-(-a.nbytes // os.sysconf("SC_PAGE_SIZE")) for a in state.values())
    final = released_lines(out)
    same = final == expected and zlib.crc32(state["grid"].tobytes()) == expected_grid
    repeated = len(final) - len(set(final))
    command_ran = marker.exists() and marker.read_text().split()[0] == str(failover.fields["epoch"])
    print(f"every output the primary released is covered by the replica's checkpoint: {'yes' if covered else 'NO'}")
    print(f"outputs repeated by the resumed run: {repeated}")
    print(f"the resumed run's first checkpoint carried every page: {'yes' if every_page else 'NO'}")
    print(f"on-failover command ran with the replica's epoch: {'yes' if command_ran else 'NO'}")
    print(f"final output and grid equal an uninterrupted run: {'yes' if same else 'NO'}")
    return 0 if covered and same and not repeated and every_page and command_ran else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="simulation steps, one checkpoint each (default 120)")
    parser.add_argument("--rate", type=float, default=30.0, help="primary's checkpoints per second (default 30)")
    parser.add_argument("--size", type=int, default=192, help="grid side in cells (default 192)")
    parser.add_argument("--seed", type=int, default=None, help="chooses the moment of the kill (default: random)")
    parser.add_argument("--role", choices=("backup", "primary"), default="backup", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    parser.add_argument("--ack", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 10 or args.rate <= 0 or args.size < 8:
        parser.error("need --steps >= 10, --rate > 0, --size >= 8")
    try:
        if args.role == "primary":
            return primary(args)
        if args.seed is None:
            args.seed = random.randrange(1 << 30)
        print(f"seed {args.seed}")
        with tempfile.TemporaryDirectory(prefix="failover-") as scratch:
            return backup(args, Path(scratch))
    except PagepipeError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
