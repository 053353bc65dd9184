"""Failure detection benchmark: no false failover while the primary lives, and how soon a dead one is noticed.

``pagepipe bench failover [--seconds 600] [--rounds 3] [--burn 2]``: a primary
(a child process: ``region-src ! classify ! xor-delta ! rle ! zstd ! frame !
zmq-sink``, 16 MiB with 1 % written per checkpoint at ``--rate`` 40/s) replicates
to a receiver in this process (``zmq-src failover=true ! deframe ! decode !
replica-sink``, the defaults: heartbeat 100 ms, failover after 1 s) while
``--burn`` processes keep every core busy. The soak runs ``--seconds``
(the target's 10 minutes by default) and counts failovers: any is false. Then, for
``--rounds`` rounds, a fresh primary runs a moment and is SIGKILLed a second after its first epoch is committed: the time from
its last message (the ``failover`` message's ``last_heard``) to the failover
message is the detection time (median; the worst is printed too). Targets: no false
failover; detection <= 1.2 s.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from pipeline.pipeline import Pipeline
from stages.apps.demo import free_tcp_endpoint

DETECTION_TARGET = 1.2


def primary(stream: str, rate: float, size: int) -> None:
    """The primary: checkpoints a tracked array forever (until killed)."""
    from stages.classify import Classify
    from stages.entropy import Zstd
    from stages.framer import Frame
    from stages.rle import RunLengthEncode
    from stages.trackers.region import PAGE_SIZE, RegionSource, tracked_array
    from stages.transport import ZmqSink
    from stages.xor_delta import XorDelta

    memory = tracked_array(size, np.uint8)
    rng = np.random.default_rng(0)
    source = RegionSource(regions={"memory": memory})
    sender = Pipeline.chain(source, Classify(), XorDelta(), RunLengthEncode(), Zstd(), Frame(),
                            ZmqSink(endpoint=stream, timeout="600s", insecure=True))
    with sender.start(mode="inline"):
        began, index = time.monotonic(), 0
        while True:
            memory[rng.choice(size // PAGE_SIZE, max(1, size // PAGE_SIZE // 100)) * PAGE_SIZE] += 1
            source.checkpoint()
            index += 1
            time.sleep(max(0.0, began + index / rate - time.monotonic()))


def _burn() -> None:
    while True:
        pass


def watch(seconds: float, rate: float, size: int,
          kill_after: float | None) -> tuple[list, tuple[float, float] | None]:
    """Run a primary and a receiver for ``seconds`` (or kill the primary after ``kill_after`` and wait for the
    failover): the failover messages seen (with the wall time each arrived), and the kill's detection time
    after the primary's last message."""
    stream = free_tcp_endpoint()
    failovers: list = []

    def collect(message) -> None:
        if message.kind == "failover":
            failovers.append((message, time.time()))

    with tempfile.TemporaryDirectory(prefix="bench-failover-") as replica:
        receiver = Pipeline.parse(f"zmq-src endpoint={stream} insecure=true failover=true ! deframe ! decode ! "
                                  f"replica-sink path={replica} fsync=false")
        with receiver.start(mode="process", on_message=collect):
            child = subprocess.Popen([sys.executable, "-m", __name__, "--role", "primary", "--stream", stream,
                                      "--rate", str(rate), "--size", str(size)])
            try:
                heard = os.path.join(replica, "manifest.json")   # the first epoch committed: the receiver heard it
                while kill_after is not None and not os.path.exists(heard) and child.poll() is None:
                    time.sleep(0.05)
                ends = time.monotonic() + (kill_after if kill_after is not None else seconds)
                while time.monotonic() < ends and child.poll() is None:
                    time.sleep(0.05)
                if kill_after is not None:
                    child.send_signal(signal.SIGKILL)
                deadline = time.monotonic() + (15 if kill_after is not None else 0.5)
                while not failovers and time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                child.kill()
                child.wait()
    if kill_after is not None and failovers:
        message, arrived = failovers[0]
        return failovers, (message.fields["silence"], arrived - message.fields["last_heard"])
    return failovers, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench failover", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="soak with the primary alive (default 600)")
    parser.add_argument("--rounds", type=int, default=3, help="kills timed for detection (default 3)")
    parser.add_argument("--burn", type=int, default=os.cpu_count() or 2, help="busy-loop processes for load")
    parser.add_argument("--rate", type=float, default=40.0, help="primary's checkpoints per second (default 40)")
    parser.add_argument("--size", type=int, default=16 << 20, help="primary's tracked bytes (default 16 MiB)")
    parser.add_argument("--role", choices=("bench", "primary"), default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--stream", help=argparse.SUPPRESS)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        return 2
    if args.role == "primary":
        primary(args.stream, args.rate, args.size)
        return 0
    if args.seconds <= 0 or args.rounds < 1 or args.burn < 0:
        return 2
    burners = [multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(args.burn)]
    for burner in burners:
        burner.start()
    try:
        print(f"failover: soak of {args.seconds:g} s, primary alive, {args.burn} busy processes...", flush=True)
        false, _ = watch(args.seconds, args.rate, args.size, kill_after=None)
        detections = []
        for _ in range(args.rounds):
            found, detection = watch(0, args.rate, args.size, kill_after=1.0)
            if detection is not None:
                detections.append(detection)
    finally:
        for burner in burners:
            burner.kill()
            burner.join()
    soak_verdict = "met" if not false else "MISSED"
    print(f"  false failovers in {args.seconds:g} s with the primary alive: {len(false)}; target 0: {soak_verdict}")
    if len(detections) < args.rounds:
        print(f"  {args.rounds - len(detections)} of {args.rounds} kills were never detected: MISSED")
        return 1
    declared = statistics.median(silence for silence, _ in detections)
    acted = [arrived for _, arrived in detections]
    median = statistics.median(acted)
    detect_verdict = "met" if median <= DETECTION_TARGET else "MISSED"
    print(f"  sender declared lost by zmq-src {declared:.3f} s (median) after its last message; the failover "
          f"message (replica durable, command started) arrived after {median:.3f} s (median), worst "
          f"{max(acted):.3f} s, over {args.rounds} kills; target median <= {DETECTION_TARGET} s: {detect_verdict}")
    return 0 if soak_verdict == detect_verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main())
