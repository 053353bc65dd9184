"""Two receivers on one replica: the second must be refused, every time.

Each trial starts a real receiver (``pagepipe launch "zmq-src ... ! deframe ! decode !
replica-sink path=R"``, process mode: the sink and its lock live in a worker
process), waits until it holds the replica's lock, then starts a second receiver on
the same replica (inline mode, its own endpoint). The trial counts as refused when
the second exits non-zero saying another receiver writes the replica, and the first
is still running and holding the lock. Both are stopped (their whole process
groups) before the next trial.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.replica_store import replica_locked

_WAIT_S = 60.0


@dataclass
class LockTally:
    trials: int = 0
    refused: int = 0
    failures: list[str] = field(default_factory=list)


def _receiver(replica: Path, endpoint: str, mode: str, capture: bool) -> subprocess.Popen:
    line = f"zmq-src endpoint={endpoint} ! deframe resume=true ! decode ! replica-sink path={replica} fsync=false"
    pagepipe = Path(sys.executable).with_name("pagepipe")
    return subprocess.Popen([str(pagepipe), "launch", "--mode", mode, line],
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)      # anything of its group that outlived it
    except ProcessLookupError:
        pass


def lock_trials(trials: int) -> LockTally:
    tally = LockTally()
    with tempfile.TemporaryDirectory() as directory:
        replica = Path(directory) / "replica"
        for trial in range(trials):
            tally.trials += 1
            first = _receiver(replica, f"ipc://{directory}/first", "process", capture=False)
            second = None
            try:
                deadline = time.monotonic() + _WAIT_S
                while not replica_locked(replica) and first.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not replica_locked(replica):
                    tally.failures.append(f"trial {trial}: the first receiver never held the lock "
                                          f"({first.poll()=})")
                    continue
                second = _receiver(replica, f"ipc://{directory}/second", "inline", capture=True)
                try:
                    output, _ = second.communicate(timeout=_WAIT_S)
                except subprocess.TimeoutExpired:
                    tally.failures.append(f"trial {trial}: the second receiver was not refused within {_WAIT_S} s")
                    continue
                if second.returncode != 0 and "another receiver is writing it" in output \
                        and first.poll() is None and replica_locked(replica):
                    tally.refused += 1
                else:
                    tally.failures.append(f"trial {trial}: second exited {second.returncode}: "
                                          f"{output.strip()[-300:]}")
            finally:
                for process in (second, first):
                    if process is not None:
                        _stop(process)
    return tally
