"""Syscall injection that a tracer's death (SIGKILL included) cannot leave half done.

The danger: while a thread of the target holds our registers (rip on a
``syscall`` instruction, our arguments), the death of its tracer detaches it
and it would run on with them. Two things cover that window:

1. The target is in a group-stop during the injection (we send SIGSTOP and
   let the injecting thread take it; a target stopped by someone else already
   is). A tracee detached by its tracer's death while a group-stop is in
   effect re-enters the stop before it runs any instruction of its own.
   Syscall tracing (not single-stepping) drives the call, and the kernel
   clears that on detach, so nothing is left pending on the thread.
2. A guardian process (its own session, started before any injection) is
   told the saved registers (and patched code word) before they are changed.
   When the pipe from pagepipe closes while it holds them, it waits until the
   thread is free of its dead tracer, seizes it, puts back the registers and
   code, records the descriptor a finished ``userfaultfd()`` returned in the
   marker file (so the next attach closes it), and sends SIGCONT if we sent the
   SIGSTOP. When the injection ends normally the guardian sends that SIGCONT,
   so a death between the end and the SIGCONT cannot leave the target stopped.

Residual risks, stated: the target's parent sees a stop/continue (SIGCHLD
with CLD_STOPPED/CLD_CONTINUED) at each injection (twice per attach: the
userfaultfd() and the close() at detach); a SIGCONT sent to the target by
someone else during the injection ends the group-stop and reopens the window
for those microseconds; if the guardian and pagepipe both die inside the same
window the target stays stopped (state T, never running on our registers).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pipeline.errors import TrackerError

from . import ptrace

_GUARDIAN_MODULE = "stages.trackers.injection_guard"


class Guardian:
    """The watching process (see the module docstring); one per tracked target, for its whole session."""

    def __init__(self) -> None:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen([sys.executable, "-m", _GUARDIAN_MODULE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         start_new_session=True, env=environment)
        self._ready = False

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def wait_ready(self) -> None:
        """Wait until the guardian has started (a Python start-up), so that no pause waits for it."""
        if not self._ready:
            try:
                self._expect("ready")
            except (OSError, ValueError):
                raise TrackerError("the injection guardian has ended; not injecting without it") from None
            self._ready = True

    def _ask(self, line: str) -> None:
        self.wait_ready()
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
            self._expect("ok")
        except (BrokenPipeError, OSError, ValueError):
            raise TrackerError("the injection guardian has ended; not injecting without it") from None

    def _expect(self, word: str) -> None:
        assert self._process.stdout is not None
        answer = self._process.stdout.readline().strip()
        if answer != word:
            raise TrackerError(f"the injection guardian answered {answer!r}, not {word!r}")

    def watch(self, pid: int, continue_after: bool) -> None:
        """Before the SIGSTOP: on our death, SIGCONT ``pid`` if ``continue_after``."""
        self._ask(f"watch {pid} {int(continue_after)}")

    def hold(self, injection: ptrace.Injection, number: int, marker: str) -> None:
        """Before changing registers: on our death, restore them (and note a uffd in ``marker``)."""
        regs = bytes(injection.saved).hex()
        patched = injection.patched_address or 0
        self._ask(f"hold {injection.tid} {number} {patched} {injection.patched_word} {marker or '-'} {regs}")

    def release(self) -> None:
        """The injection is over and undone: the guardian sends the SIGCONT (if any) and forgets."""
        self._ask("release")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def guarded_inject(guardian: Guardian, pid: int, stop: ptrace.Stop, number: int, arguments: tuple[int, ...],
                   marker: str = "") -> int:
    """Run one system call in the stopped thread ``stop`` of ``pid`` under the guardian's cover.

    Call on the Tracer's thread (``tracer.call(guarded_inject, ...)``). Returns
    the raw result; signals taken off the thread meanwhile are sent back to it.
    """
    tid = stop.tid
    stopped_by_others = stop.kind == "group"
    taking_sigstop = stop.kind == "signal" and stop.signal == signal.SIGSTOP  # someone's SIGSTOP, caught mid-way
    # e.g. left stopped at the end: keep it so
    stop_pending = not stopped_by_others and (taking_sigstop or sigstop_pending(pid))
    gadget = ptrace.find_syscall_instruction(pid)
    owed: list[int] = [stop.signal] if stop.kind == "signal" and stop.signal and not taking_sigstop else []
    guardian.watch(pid, continue_after=not (stopped_by_others or stop_pending))
    try:
        if not stopped_by_others:
            _enter_group_stop(pid, tid, owed, send=not stop_pending,
                              deliver=signal.SIGSTOP if taking_sigstop else 0)
        injection = ptrace.prepare_injection(tid, gadget)
        guardian.hold(injection, number, marker)
        result, arrived = ptrace.inject_syscall(tid, number, arguments, gadget, injection)
        owed.extend(arrived)
    finally:
        try:
            guardian.release()
        except TrackerError:
            if not (stopped_by_others or stop_pending):
                os.kill(pid, signal.SIGCONT)
            raise
    stop.kind, stop.signal = ("group" if stopped_by_others or stop_pending else "interrupt"), 0
    for owed_signal in owed:
        if owed_signal not in (signal.SIGSTOP, signal.SIGTRAP):
            os.kill(pid, owed_signal)  # delivered when the process runs again
    return result


def sigstop_pending(pid: int) -> bool:
    """Whether a SIGSTOP waits to be taken by the process (or one of its threads)."""
    bit = 1 << (signal.SIGSTOP - 1)
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(int(line.split()[1], 16) & bit for line in status if line.startswith(("ShdPnd:", "SigPnd:")))
    except FileNotFoundError:
        return False


def _enter_group_stop(pid: int, tid: int, owed: list[int], send: bool = True, deliver: int = 0) -> None:
    """SIGSTOP the process (unless one is pending already, or ``deliver`` is the SIGSTOP the thread is
    taking) and let thread ``tid`` take it, so a group-stop is in effect."""
    if send and not deliver:
        os.kill(pid, signal.SIGSTOP)
    while True:
        ptrace._ptrace(ptrace.PTRACE_CONT, tid, 0, deliver, "CONT")
        deliver = 0
        stop = ptrace.wait_stop(tid, 5.0)
        if stop.kind == "exited":
            raise ptrace.ThreadGone(f"thread {tid} exited while being stopped for an injection")
        if stop.kind == "group":
            return
        if stop.kind == "signal" and stop.signal == signal.SIGSTOP:
            deliver = signal.SIGSTOP  # let it start the group-stop
        elif stop.kind == "signal":
            owed.append(stop.signal)


# -- the guardian process ------------------------------------------------------------------------

def _untraced(tid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{tid}/status") as status:
                for line in status:
                    if line.startswith("TracerPid:"):
                        if int(line.split()[1]) == 0:
                            return True
                        break
        except FileNotFoundError:
            return False
        time.sleep(0.001)
    return False


def _recover(pid: int, held: list[str] | None) -> None:
    """Our tracer died with the injection open: put the thread back, note the fd, resume if we stopped it."""
    if held is None:
        return
    tid, number, patched, word, marker, regs_hex = held
    if not _untraced(int(tid), 10.0):
        return
    saved = ptrace.Regs.from_buffer_copy(bytes.fromhex(regs_hex))
    stops = {}
    try:
        ptrace.seize(int(tid))
        ptrace.interrupt(int(tid))
        stop = ptrace.wait_stop(int(tid), 5.0)
        stops[int(tid)] = stop
        now = ptrace.get_regs(int(tid))
        if marker != "-" and now.orig_rax == int(number) and now.rax < 1 << 63:
            with open(marker, "w") as note:  # the call ran: its descriptor must be closed by the next attach
                note.write(str(now.rax))
        ptrace.restore_injection(ptrace.Injection(int(tid), saved, int(patched) or None, int(word)))
    except TrackerError:
        pass
    finally:
        ptrace.release_threads(stops)


def _serve() -> None:
    for name in ("SIGINT", "SIGHUP", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)  # only the closing of our pipe ends us
    print("ready", flush=True)
    pid, continue_after, held = 0, False, None
    for line in sys.stdin:
        words = line.split()
        if words[0] == "watch":
            pid, continue_after, held = int(words[1]), words[2] == "1", None
        elif words[0] == "hold":
            held = words[1:]
        elif words[0] == "release":
            if continue_after:
                os.kill(pid, signal.SIGCONT)
            pid, continue_after, held = 0, False, None
        print("ok", flush=True)
    if pid:  # pagepipe died inside an injection
        _recover(pid, held)
        if continue_after:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    _serve()
