"""Stopping a set of processes for a checkpoint, in a way that cannot leave them frozen.

``PtraceFreezer`` (the default) seizes and interrupts every thread of every
process (PTRACE_SEIZE + PTRACE_INTERRUPT, through ``ptrace.Tracer``'s one OS
thread) and detaches them to resume. While they are stopped only the tracer
holds them: if pagepipe dies, SIGKILL included, the kernel detaches and they
run on. Nothing stays attached between checkpoints, so the target's signals
are never routed through pagepipe while it runs.

``SignalFreezer`` is the fallback for a process someone else already traces
(a debugger; ptrace allows one tracer): SIGSTOP and SIGCONT, watched by a
guardian process of its own session that sends SIGCONT when the pipe from
pagepipe closes while the processes are stopped, whatever ended pagepipe.

``stop_at_end``: ``thaw(keep_stopped=True)`` leaves the processes stopped
after pagepipe is gone (a pending SIGSTOP delivered as they are released).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable

from pipeline.errors import TrackerError

from .procmem import ProcessGone, wait_stopped
from .targets import alive
from .ptrace import ThreadGone, Tracer, release_threads, stop_threads

_WALL = 0x40000000
Members = Callable[[], Iterable[int]]
"""Lists the processes to stop, called until it names no process not yet stopped (new ones may appear)."""

PERMISSION_HINT = ("ptrace needs pagepipe to run as the same user as the target (or as root, or with "
                   "CAP_SYS_PTRACE), and /proc/sys/kernel/yama/ptrace_scope at 0 (or 1 with pagepipe an "
                   "ancestor of the target)")


def tracer_of(pid: int) -> int:
    """The pid tracing ``pid`` (0: none); ProcessGone if it exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise ProcessGone(pid) from None
    return 0


class PtraceFreezer:
    """Stops processes with ptrace for the length of a checkpoint (see the module docstring)."""

    method = "ptrace"

    def __init__(self, stop_timeout: float):
        self.stop_timeout = stop_timeout
        self.tracer = Tracer("pagepipe-freezer")
        """The thread every ptrace request about a stopped process must come from (``tracer.call``)."""
        self._stops: dict[int, dict] = {}

    def freeze(self, members: Members) -> list[int]:
        """Stop every member (every thread); returns those stopped. ProcessGone if none is left.

        On any error the processes stopped so far are resumed before it is raised.
        """
        try:
            return self.tracer.call(self._freeze, members)
        except BaseException:
            self.thaw()
            raise

    def _freeze(self, members: Members) -> list[int]:
        gone: set[int] = set()
        while True:
            fresh = [pid for pid in members() if pid not in self._stops and pid not in gone]
            if not fresh:
                break
            for pid in fresh:
                stops = self._stop_process(pid)
                if stops is None:
                    gone.add(pid)
                else:
                    self._stops[pid] = stops
        if not self._stops:
            raise ProcessGone(next(iter(gone), 0))
        return sorted(self._stops)

    def _stop_process(self, pid: int, attempts: int = 3) -> dict | None:
        """Every thread of ``pid`` stopped, or None if it exited. A thread that is exiting cannot be seized
        (EPERM) for a moment: such a failure is tried again before it counts."""
        for attempt in range(attempts):
            try:
                return stop_threads(pid, self.stop_timeout)
            except ThreadGone:
                return None
            except TrackerError as exc:
                if not alive(pid):
                    return None
                if attempt == attempts - 1 or tracer_of(pid) not in (0, os.getpid()):
                    raise self._explain(pid, exc) from None
                time.sleep(0.001)
        return None

    def stops(self, pid: int) -> dict:
        """How each thread of a stopped process is stopped (tid -> ptrace.Stop), for requests that need a thread in
        a ptrace-stop (syscall injection, through ``tracer``); empty if ``pid`` is not stopped."""
        return self._stops.get(pid, {})

    def _explain(self, pid: int, exc: TrackerError) -> TrackerError:
        try:
            tracer = tracer_of(pid)
        except ProcessGone:
            tracer = 0
        if tracer and tracer != os.getpid():
            return AlreadyTraced(f"pid {pid} is already traced by pid {tracer}")
        if "Operation not permitted" in str(exc):
            return TrackerError(f"cannot stop pid {pid} with ptrace: {exc}; {PERMISSION_HINT}")
        return TrackerError(f"cannot stop pid {pid}: {exc}")

    def thaw(self, keep_stopped: bool = False) -> None:
        """Resume every stopped process (or leave them stopped for good with ``keep_stopped``)."""
        stops, self._stops = self._stops, {}
        if keep_stopped:
            for pid in stops:
                _signal(pid, signal.SIGSTOP)  # pending when released: taken before any instruction runs
        for pid_stops in stops.values():
            self.tracer.call(_release, pid_stops)

    def close(self) -> None:
        self.thaw()
        self.tracer.close()


def _release(stops: dict) -> None:
    """Detach the threads; reap those that died while stopped, which hands them back to their parent
    (a dead tracee waits for its tracer before its parent can reap it)."""
    release_threads(stops)
    for tid in stops:
        try:
            os.waitpid(tid, os.WNOHANG | _WALL)
        except ChildProcessError:
            pass  # detached alive: not ours to wait for


class AlreadyTraced(TrackerError):
    """A process cannot be seized because another tracer holds it."""


class SignalFreezer:
    """SIGSTOP/SIGCONT with a guardian process that resumes the processes if pagepipe dies while they are stopped."""

    method = "signal"

    def __init__(self, stop_timeout: float):
        self.stop_timeout = stop_timeout
        self._stopped: list[int] = []
        self._guardian = subprocess.Popen([sys.executable, "-c", _GUARDIAN], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True, text=True)

    def _tell(self, line: str) -> None:
        pipe = self._guardian.stdin
        try:
            if pipe is None:
                raise ValueError("no pipe")
            pipe.write(line + "\n")
            pipe.flush()
        except (BrokenPipeError, ValueError):
            raise TrackerError("the guardian that resumes stopped processes has ended; not stopping any") from None

    def freeze(self, members: Members) -> list[int]:
        try:
            while True:
                fresh = [pid for pid in members() if pid not in self._stopped]
                if not fresh:
                    break
                self._tell("stop " + " ".join(map(str, fresh)))  # before the signal: a death between is covered
                for pid in fresh:
                    if _signal(pid, signal.SIGSTOP):
                        self._stopped.append(pid)
                for pid in fresh:
                    try:
                        wait_stopped(pid, self.stop_timeout)
                    except ProcessGone:
                        self._stopped.remove(pid)
        except BaseException:
            self.thaw()
            raise
        if not self._stopped:
            raise ProcessGone(0)
        return sorted(self._stopped)

    def thaw(self, keep_stopped: bool = False) -> None:
        stopped, self._stopped = self._stopped, []
        if not keep_stopped:
            for pid in stopped:
                _signal(pid, signal.SIGCONT)
        if self._guardian.poll() is None:
            self._tell("run")

    def close(self) -> None:
        self.thaw()
        if self._guardian.stdin:
            self._guardian.stdin.close()
        self._guardian.wait()


def _signal(pid: int, number: int) -> bool:
    try:
        os.kill(pid, number)
        return True
    except ProcessLookupError:
        return False


_GUARDIAN = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
stopped = set()
for line in sys.stdin:  # ends when pagepipe's end of the pipe closes, however pagepipe ended
    command, *pids = line.split()
    if command == "stop":
        stopped.update(map(int, pids))
    elif command == "run":
        stopped.clear()
for pid in stopped:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
"""


def open_freezer(pids: Iterable[int], stop_timeout: float, warn: Callable[[str], None]) -> PtraceFreezer | SignalFreezer:
    """A PtraceFreezer, or a SignalFreezer (with a warning saying why) when one of ``pids`` is already traced."""
    for pid in pids:
        try:
            tracer = tracer_of(pid)
        except ProcessGone:
            continue
        if tracer and tracer != os.getpid():
            warn(f"pid {pid} is already traced by pid {tracer}: stopping with SIGSTOP/SIGCONT instead of ptrace, "
                 f"a guardian process resumes it if pagepipe dies while it is stopped")
            return SignalFreezer(stop_timeout)
    return PtraceFreezer(stop_timeout)
