"""Restart after SIGKILL: does a receiver come back on the same endpoint at once?

``pagepipe bench restart [--runs 20] [--command launch|stage|both]``. Each run
starts the README's receiver on a tcp endpoint (``pagepipe launch "zmq-src
... ! deframe resume=true ! decode ! replica-sink ..."``, or its zmq-src alone
as ``pagepipe stage``), waits until the port listens, kills the command with
SIGKILL and measures

- how long until the port can be bound again (as ZeroMQ binds it:
  SO_REUSEADDR), and until every process the command had started is gone
  (workers, the fork server, the resource tracker);
- whether the same command, started again right away on the same endpoint and
  replica, binds it.

Target (issue 10): 20 of 20 runs bind within 1 s. Exit status 1 if missed.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TARGET_SECONDS = 1.0
START_TIMEOUT = 60.0
GIVE_UP_SECONDS = 30.0


@dataclass
class RestartRun:
    command: str
    port_free_seconds: float
    processes_gone_seconds: float
    leftovers: int
    """Processes of the killed command still alive after GIVE_UP_SECONDS."""
    restarted: bool


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def receiver_command(kind: str, port: int, scratch: Path) -> list[str]:
    """The receiver the README describes, on 127.0.0.1:port (insecure: this measures processes, not keys)."""
    endpoint = f"endpoint=tcp://127.0.0.1:{port} insecure=true"
    if kind == "launch":
        return [sys.executable, "-m", "pipeline.cli", "launch",
                f"zmq-src {endpoint} ! deframe resume=true ! decode ! replica-sink path={scratch / 'replica'} "
                f"fsync=false"]
    return [sys.executable, "-m", "pipeline.cli", "stage", "zmq-src", *endpoint.split(),
            "--output", f"ipc://{scratch}/out.ipc"]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def descendants(root: int) -> set[int]:
    """Living (non-zombie) processes below ``root``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found.update(children)
        frontier.extend(children)
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            living.add(pid)
    return living


def start_and_wait(command: list[str], port: int) -> subprocess.Popen:
    """Start the receiver; return once its port listens (RuntimeError with its output if it does not)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            output = process.stdout.read() if process.stdout is not None else ""
            raise RuntimeError(f"{' '.join(command[3:5])} did not bind port {port}: {output[-2000:]}")
        time.sleep(0.02)
    return process


def stop(process: subprocess.Popen) -> None:
    """End a receiver and everything it started (its session), for clean-up."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def kill_and_restart(kind: str, scratch: Path) -> RestartRun:
    """One run: start, SIGKILL, measure, start again on the same endpoint."""
    port = free_port()
    command = receiver_command(kind, port, scratch)
    first = start_and_wait(command, port)
    time.sleep(0.2)                                   # past start-up: every worker running
    started = descendants(first.pid)
    killed_at = time.monotonic()
    first.kill()
    first.wait()
    port_free = processes_gone = None
    while time.monotonic() - killed_at < GIVE_UP_SECONDS and (port_free is None or processes_gone is None):
        now = time.monotonic() - killed_at
        if port_free is None and bindable(port):
            port_free = now
        if processes_gone is None and not alive(started):
            processes_gone = now
        time.sleep(0.005)
    leftovers = alive(started)
    for pid in leftovers:                             # do not leave them behind for the next run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    restarted = False
    if port_free is not None:
        try:
            again = start_and_wait(command, port)
            restarted = True
            stop(again)
        except RuntimeError:
            pass
    return RestartRun(kind, port_free if port_free is not None else float("inf"),
                      processes_gone if processes_gone is not None else float("inf"), len(leftovers), restarted)


def run_campaign(kind: str, runs: int) -> list[RestartRun]:
    with tempfile.TemporaryDirectory(prefix="pagepipe-restart-") as scratch:
        return [kill_and_restart(kind, Path(scratch)) for _ in range(runs)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagepipe bench restart", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="kill/restart cycles per command (20)")
    parser.add_argument("--command", choices=("launch", "stage", "both"), default="both")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    met = True
    for kind in (("launch", "stage") if args.command == "both" else (args.command,)):
        results = run_campaign(kind, args.runs)
        within = sum(r.port_free_seconds <= TARGET_SECONDS and r.processes_gone_seconds <= TARGET_SECONDS
                     and r.restarted for r in results)
        ok = within == len(results)
        met &= ok
        print(f"pagepipe {kind}: SIGKILL then restart on the same endpoint, {len(results)} runs: "
              f"port free after median {statistics.median(r.port_free_seconds for r in results) * 1e3:.0f} ms "
              f"(max {max(r.port_free_seconds for r in results) * 1e3:.0f} ms), every process gone after median "
              f"{statistics.median(r.processes_gone_seconds for r in results) * 1e3:.0f} ms "
              f"(max {max(r.processes_gone_seconds for r in results) * 1e3:.0f} ms), "
              f"{sum(r.leftovers for r in results)} left over, {sum(r.restarted for r in results)} restarted; "
              f"{within} of {len(results)} within {TARGET_SECONDS:g} s: {'met' if ok else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
