"""Kill campaign: is a process-src target ever left stopped when pagepipe is killed?

``pagepipe bench kill_campaign --runs 50`` or ``python -m stages.bench.kill_campaign``.
Each run starts a target (a Python child writing its memory and a heartbeat
counter), then ``pagepipe launch "process-src pid=... ! ... "`` in process
mode (its sink is a file, or every other run a zmq-sink to a receiver that
never comes, which fails after its timeout), and at a random moment sends
SIGTERM or SIGKILL to a random process of that pagepipe (the launcher, a
worker, any helper): in half the runs 0-2 s after the launch (start-up and
first attach), in the others 0-1 s after all its processes are up. It then waits for every
pagepipe process to end and checks the target: a target whose threads are
still stopped (``T``/``t``) or whose heartbeat does not advance counts as left
stopped. A pipeline that runs on after the kill (it lost a helper it can do
without) is stopped with SIGINT after 10 s; pagepipe processes still running
after that are counted as left behind (a runtime defect, reported apart).
Target of issue 8: 0 targets left stopped over 50 runs. Exit status: 0 when
no target was left stopped or died, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.trackers.procmem import thread_states
from stages.trackers.targets import TargetSet, alive

TARGET = textwrap.dedent("""
    import mmap, random, struct, sys, time
    with open(sys.argv[1], "r+b") as file:
        beat = mmap.mmap(file.fileno(), 8)
    data = bytearray(int(sys.argv[2]))
    rng, count = random.Random(1), 0
    while True:
        count += 1
        beat[:8] = struct.pack("<Q", count)
        for _ in range(64):
            data[rng.randrange(len(data))] = count & 255
        time.sleep(0.001)
""")

ENDS_WITHIN = 10.0
"""Seconds every pagepipe process gets to end after the kill before it counts as left behind."""


@dataclass
class Outcome:
    """One run: what was killed, when, how; what it left."""

    victim: str
    signal: str
    moment: float
    left_stopped: bool
    target_died: bool
    left_behind: list[int] = field(default_factory=list)
    survived: bool = False
    """The pipeline ran on after the kill (it was stopped with SIGINT after a while)."""
    phase: str = "start-up"
    """When the kill came: during the start-up (first attach included) or once every process was running."""

    def line(self) -> str:
        verdict = "LEFT STOPPED" if self.left_stopped else "target died" if self.target_died else "target runs"
        behind = f", {len(self.left_behind)} pagepipe processes left behind" if self.left_behind else ""
        survived = " (pipeline ran on; stopped with SIGINT)" if self.survived else ""
        return f"{self.signal} to {self.victim} at {self.moment:.2f} s ({self.phase}): {verdict}{survived}{behind}"


def _heartbeat(path: Path) -> int:
    with open(path, "rb") as file:
        return struct.unpack("<Q", file.read(8))[0]


def _runs_on(pid: int, beat: Path, within: float = 5.0) -> bool:
    """Whether the target leaves every stop and its heartbeat advances within ``within`` seconds."""
    deadline = time.monotonic() + within
    start = _heartbeat(beat)
    while time.monotonic() < deadline:
        if not set(thread_states(pid)) & set("Tt") and _heartbeat(beat) > start:
            return True
        time.sleep(0.02)
    return False


def _describe(pid: int, launcher: int) -> str:
    """What a pagepipe process is: the launcher, the forkserver, a worker (forked by it), a helper."""
    if pid == launcher:
        return "the launcher"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            text = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat", "rb") as stat:
            parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return f"pid {pid}"
    if "forkserver" in text:
        return "the forkserver" if parent == launcher else "a worker"
    if "resource_tracker" in text:
        return "the resource tracker"
    return "a helper"


def _wait_until_running(launcher: subprocess.Popen, target: int, settle: float = 0.5, limit: float = 30.0) -> None:
    """Wait until the pipeline's processes are all up: at least four, their set unchanged for ``settle`` s."""
    deadline = time.monotonic() + limit
    family: set[int] = set()
    stable_since = time.monotonic()
    while time.monotonic() < deadline and launcher.poll() is None:
        now = set(TargetSet([launcher.pid], tree=True).members()) - {target}
        if now != family:
            family, stable_since = now, time.monotonic()
        elif len(family) >= 4 and time.monotonic() - stable_since >= settle:
            return
        time.sleep(0.05)


def _wait_for_end(launcher: subprocess.Popen, family: set[int], target: int) -> bool:
    """Wait up to ENDS_WITHIN s for the launcher and every pagepipe process to end (``family`` grows with the
    processes found meanwhile); True if some are still running."""
    deadline = time.monotonic() + ENDS_WITHIN
    while True:
        if launcher.poll() is None:
            family |= set(TargetSet([launcher.pid], tree=True).members()) - {target}
        if not any(alive(pid) for pid in family) or time.monotonic() > deadline:
            return any(alive(pid) for pid in family)
        time.sleep(0.05)


def one_run(rng: random.Random, workdir: Path, target_bytes: int) -> Outcome:
    beat = workdir / "heartbeat"
    beat.write_bytes(bytes(8))
    target = subprocess.Popen([sys.executable, "-c", TARGET, str(beat), str(target_bytes)])
    launcher = None
    try:
        deadline = time.monotonic() + 30
        while not _heartbeat(beat) and target.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the target is up once it beats
        sink = (f"file-sink path={workdir / 'stream'}" if rng.random() < 0.5
                else "zmq-sink endpoint=tcp://127.0.0.1:9 timeout=300ms insecure=true")  # nobody listens
        launcher = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "launch", "--timeout", "60",
                                     f"process-src pid={target.pid} interval=10ms ! classify ! xor-delta ! rle ! "
                                     f"zstd ! frame ! {sink}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        began = time.monotonic()
        phase = "start-up" if rng.random() < 0.5 else "running"
        if phase == "running":
            _wait_until_running(launcher, target.pid)
        time.sleep(rng.uniform(0.0, 2.0 if phase == "start-up" else 1.0))
        moment = time.monotonic() - began
        family = set(TargetSet([launcher.pid], tree=True).members()) - {target.pid}
        victim = rng.choice(sorted(family)) if family else launcher.pid
        number = rng.choice([signal.SIGTERM, signal.SIGKILL])
        name = _describe(victim, launcher.pid)
        try:
            os.kill(victim, number)
        except ProcessLookupError:
            pass
        survived = _wait_for_end(launcher, family, target.pid) and launcher.poll() is None
        if survived:  # the pipeline lived through the kill (a helper it can do without): stop it as a user would
            os.kill(launcher.pid, signal.SIGINT)
            _wait_for_end(launcher, family, target.pid)
        left_behind = sorted(pid for pid in family if alive(pid))
        for pid in left_behind:
            os.kill(pid, signal.SIGKILL)
        died = target.poll() is not None
        stopped = not died and not _runs_on(target.pid, beat)
        return Outcome(name, signal.Signals(number).name, moment, stopped, died, left_behind, survived, phase)
    finally:
        if launcher is not None:
            launcher.kill()
            launcher.wait()
        target.kill()
        target.wait()


def campaign(runs: int, seed: int = 1, target_bytes: int = 32 << 20, verbose: bool = False) -> list[Outcome]:
    """``runs`` runs, each killing one random pagepipe process at a random moment."""
    rng = random.Random(seed)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="pagepipe-kill-") as workdir:
        for index in range(runs):
            outcome = one_run(rng, Path(workdir), target_bytes)
            outcomes.append(outcome)
            if verbose:
                print(f"run {index + 1:3d}: {outcome.line()}", flush=True)
    return outcomes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagepipe bench kill_campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs, each killing one process (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random moments and victims")
    parser.add_argument("--target-size", type=int, default=32, help="MiB of memory the target writes (default 32)")
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the campaign and print one line per run and the counts; exit status as the module says."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.runs < 1 or args.target_size < 1:
        print("error: --runs and --target-size must be at least 1", file=sys.stderr)
        return 2
    outcomes = campaign(args.runs, args.seed, args.target_size << 20, verbose=not args.quiet)
    stopped = sum(o.left_stopped for o in outcomes)
    died = sum(o.target_died for o in outcomes)
    behind = sum(len(o.left_behind) for o in outcomes)
    victims = collections.Counter(o.victim for o in outcomes)
    print(f"kill campaign: {len(outcomes)} runs, {stopped} targets left stopped, {died} targets died, "
          f"{behind} pagepipe processes left behind (SIGTERM {sum(o.signal == 'SIGTERM' for o in outcomes)}, "
          f"SIGKILL {sum(o.signal == 'SIGKILL' for o in outcomes)}; "
          + ", ".join(f"{victim} {count}" for victim, count in victims.most_common()) + ")")
    print(f"target: 0 targets left stopped over {len(outcomes)} runs: " + ("met" if not stopped else "MISSED"))
    return 0 if not stopped and not died else 1


if __name__ == "__main__":
    sys.exit(main())
