"""ptrace primitives (x86-64, via ctypes): seize, interrupt, resume, registers, memory words, syscall injection.

Why ptrace and not SIGSTOP: a thread stopped by PTRACE_SEIZE + PTRACE_INTERRUPT
is released by the kernel the moment its tracer dies (SIGKILL included), so a
target is never left frozen by a crashed pagepipe. PTRACE_O_EXITKILL is never
set: the target must outlive its tracer.

The rule: every ptrace request about a thread must come from the very OS
thread that seized it (the kernel checks ``tracee->parent == current``), and
the tracees are detached when that thread exits. ``Tracer`` therefore owns
one dedicated OS thread and runs all its requests there; it may be called
from any Python thread. Requests of one Tracer are serialised.

Stops (``Stop.kind``):
- ``interrupt``: PTRACE_EVENT_STOP from PTRACE_INTERRUPT (or a seize's own trap);
- ``group``: PTRACE_EVENT_STOP of a group-stop (the target was SIGSTOPped by
  someone): resumed with PTRACE_LISTEN and detached without a signal, so it
  stays stopped as its owner wants;
- ``signal``: a signal-delivery-stop; the signal is re-delivered on resume /
  detach so the target misses nothing;
- ``syscall``: a syscall-entry or -exit stop (only inside ``inject_syscall``);
- ``exited``: the thread is gone.

Syscall injection runs the call with PTRACE_SYSCALL (entry stop, exit stop),
then brings the thread to an interrupt stop inside the kernel's signal path
before putting its registers back, so that an interrupted system call of the
target is restarted exactly as without us. PTRACE_SYSCALL rather than single
step: a tracer that dies mid-step would leave the trap flag set and the
target killed by SIGTRAP; a dead tracer's syscall tracing is simply cleared.
See injection_guard.py for covering a tracer's death during the injection.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pipeline.errors import TrackerError

PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_SYSCALL = 24
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_EVENT_STOP = 128
PTRACE_O_TRACESYSGOOD = 1  # syscall stops report SIGTRAP | 0x80, telling them from a real SIGTRAP

_WNOHANG = 1
_WALL = 0x40000000
_STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
SYSCALL_INSTRUCTION = b"\x0f\x05"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.waitpid.restype = ctypes.c_int
_libc.waitpid.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int]


class ThreadGone(TrackerError):
    """The traced thread (or its whole process) exited."""


class Regs(ctypes.Structure):
    """x86-64 ``struct user_regs_struct`` (sys/user.h)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]

    def copy(self) -> "Regs":
        return Regs.from_buffer_copy(self)


@dataclass
class Stop:
    """How a thread is stopped (see the module docstring), and the signal to give back on resume."""

    tid: int
    kind: str
    signal: int = 0


def _check_arch() -> None:
    if platform.machine() != "x86_64":
        raise TrackerError(f"ptrace register access is implemented for x86_64 only, not {platform.machine()}")


def _ptrace(request: int, tid: int, address: int = 0, data: int = 0, what: str = "") -> int:
    ctypes.set_errno(0)
    result = _libc.ptrace(request, tid, ctypes.c_void_p(address), ctypes.c_void_p(data))
    code = ctypes.get_errno()
    if result == -1 and code:
        if code == errno.ESRCH:
            raise ThreadGone(f"ptrace {what or request} of thread {tid}: no such thread, or not stopped by us")
        hint = " (kernel.yama.ptrace_scope, a different user, or already traced)" if code == errno.EPERM else ""
        raise TrackerError(f"ptrace {what or request} of thread {tid}: {os.strerror(code)}{hint}")
    return result


def _decode(tid: int, status: int) -> Stop:
    if status & 0x7F == 0 or (status & 0xFF) != 0x7F:  # exited or killed
        return Stop(tid, "exited")
    sig = (status >> 8) & 0xFF
    event = status >> 16
    if event == PTRACE_EVENT_STOP:
        return Stop(tid, "group") if sig in _STOP_SIGNALS else Stop(tid, "interrupt")
    if event:
        return Stop(tid, "interrupt")  # an event we did not ask for; nothing to re-deliver
    if sig == signal.SIGTRAP | 0x80:
        return Stop(tid, "syscall")
    return Stop(tid, "signal", sig)


# Direct primitives: call them only from the thread that seized (see Tracer).

def seize(tid: int) -> None:
    """Attach to a thread without stopping it (no EXITKILL: it survives our death)."""
    _ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD, "SEIZE")


def interrupt(tid: int) -> None:
    _ptrace(PTRACE_INTERRUPT, tid, 0, 0, "INTERRUPT")


def wait_stop(tid: int, timeout: float) -> Stop:
    """Wait for the next ptrace-stop (or the exit) of a seized thread; TrackerError after ``timeout`` s."""
    status = ctypes.c_int(0)
    deadline = time.monotonic() + timeout
    spins = 0
    while True:
        got = _libc.waitpid(tid, ctypes.byref(status), _WALL | _WNOHANG)
        if got == tid:
            return _decode(tid, status.value)
        if got < 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code == errno.ECHILD:
                raise ThreadGone(f"waitpid of thread {tid}: not traced by this thread (or gone)")
            raise TrackerError(f"waitpid of thread {tid}: {os.strerror(code)}")
        if time.monotonic() > deadline:
            raise TrackerError(f"thread {tid} did not reach a ptrace-stop within {timeout} s "
                               "(uninterruptible sleep, or a vfork parent?)")
        spins += 1
        time.sleep(0 if spins < 50 else 1e-4)


def resume(stop: Stop) -> None:
    """Let a stopped thread run on: a group-stopped one keeps its group-stop (LISTEN)."""
    if stop.kind == "group":
        _ptrace(PTRACE_LISTEN, stop.tid, 0, 0, "LISTEN")
    elif stop.kind != "exited":
        _ptrace(PTRACE_CONT, stop.tid, 0, stop.signal, "CONT")


def detach(stop: Stop) -> None:
    """Release a stopped thread, giving back a pending signal; a vanished thread is fine."""
    if stop.kind == "exited":
        return
    try:
        _ptrace(PTRACE_DETACH, stop.tid, 0, stop.signal if stop.kind == "signal" else 0, "DETACH")
    except ThreadGone:
        pass


def get_regs(tid: int) -> Regs:
    _check_arch()
    regs = Regs()
    _ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs), "GETREGS")
    return regs


def set_regs(tid: int, regs: Regs) -> None:
    _check_arch()
    _ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs), "SETREGS")


def peek(tid: int, address: int) -> int:
    """One 8-byte word of the thread's memory (unsigned)."""
    return _ptrace(PTRACE_PEEKDATA, tid, address, 0, "PEEKDATA") & 0xFFFF_FFFF_FFFF_FFFF


def poke(tid: int, address: int, word: int) -> None:
    _ptrace(PTRACE_POKEDATA, tid, address, word, "POKEDATA")


def single_step(tid: int, timeout: float = 5.0) -> list[int]:
    """Run one instruction; returns the signals that arrived meanwhile (to re-deliver later)."""
    _ptrace(PTRACE_SINGLESTEP, tid, 0, 0, "SINGLESTEP")
    arrived: list[int] = []
    while True:
        stop = wait_stop(tid, timeout)
        if stop.kind == "exited":
            raise ThreadGone(f"thread {tid} exited during a single step")
        if stop.kind == "signal" and stop.signal == signal.SIGTRAP:
            return arrived
        if stop.kind == "signal":
            arrived.append(stop.signal)  # delivered on the final resume, not now
        _ptrace(PTRACE_SINGLESTEP, tid, 0, 0, "SINGLESTEP")


def find_syscall_instruction(pid: int) -> int | None:
    """Address of a ``syscall`` instruction in the process's [vdso] (executing it changes no memory of ours)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.read().splitlines()
        for line in lines:
            if line.endswith("[vdso]"):
                low, high = (int(part, 16) for part in line.split()[0].split("-"))
                with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
                    memory.seek(low)
                    code = memory.read(high - low)
                at = code.find(SYSCALL_INSTRUCTION)
                return low + at if at >= 0 else None
    except OSError:
        return None
    return None


@dataclass
class Injection:
    """What one injection changes in a thread, to restore it (also by a guardian after our death)."""

    tid: int
    saved: Regs
    patched_address: int | None = None  # where a syscall instruction was written over the code (no vdso gadget)
    patched_word: int = 0


def prepare_injection(tid: int, gadget: int | None) -> Injection:
    """Save the registers of a stopped thread; with no gadget, the code word at rip is saved for patching."""
    saved = get_regs(tid)
    if gadget is not None:
        return Injection(tid, saved)
    return Injection(tid, saved, saved.rip, peek(tid, saved.rip))


def inject_syscall(tid: int, number: int, arguments: Sequence[int] = (), gadget: int | None = None,
                   injection: Injection | None = None) -> tuple[int, list[int]]:
    """Run one system call in a thread in a ptrace-stop and restore its registers and code.

    ``gadget`` is the address of an existing ``syscall`` instruction (see
    find_syscall_instruction); without one the instruction is written over the
    word at rip and put back. Returns the raw result (negative errno on
    failure) and the signals that arrived meanwhile (the caller owes them to
    the thread: they were taken off it). The thread ends in an interrupt stop.
    Every other thread of the process must be stopped when no gadget is used
    (they could run the patch).
    """
    if len(arguments) > 6:
        raise TrackerError(f"a system call takes at most 6 arguments, not {len(arguments)}")
    injection = injection or prepare_injection(tid, gadget)
    regs = injection.saved.copy()
    regs.rax = number
    regs.orig_rax = 0xFFFF_FFFF_FFFF_FFFF  # -1: no syscall restart logic applied to our registers
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), arguments):
        setattr(regs, name, value & 0xFFFF_FFFF_FFFF_FFFF)
    regs.rip = gadget if gadget is not None else injection.saved.rip
    arrived: list[int] = []
    try:
        if injection.patched_address is not None:
            patched = (injection.patched_word & ~0xFFFF) | int.from_bytes(SYSCALL_INSTRUCTION, "little")
            poke(tid, injection.patched_address, patched)
        set_regs(tid, regs)
        _resume_until(tid, PTRACE_SYSCALL, ("syscall",), arrived)  # entry
        _resume_until(tid, PTRACE_SYSCALL, ("syscall",), arrived)  # exit
        result = get_regs(tid).rax
        interrupt(tid)  # stop again inside the signal path, where a restored interrupted call restarts
        _resume_until(tid, PTRACE_CONT, ("interrupt", "group"), arrived)
    finally:
        restore_injection(injection)
    return (result - (1 << 64) if result >= 1 << 63 else result), arrived


def _resume_until(tid: int, request: int, kinds: tuple[str, ...], arrived: list[int], timeout: float = 5.0) -> Stop:
    """Resume with ``request`` until the thread stops in one of ``kinds``; other signals are taken and listed."""
    while True:
        _ptrace(request, tid, 0, 0, "SYSCALL" if request == PTRACE_SYSCALL else "CONT")
        stop = wait_stop(tid, timeout)
        if stop.kind == "exited":
            raise ThreadGone(f"thread {tid} exited during a system call injection")
        if stop.kind in kinds:
            return stop
        if stop.kind == "signal":
            arrived.append(stop.signal)


def restore_injection(injection: Injection) -> None:
    """Put back the registers and code word an injection changed; a vanished thread is fine."""
    try:
        if injection.patched_address is not None:
            poke(injection.tid, injection.patched_address, injection.patched_word)
        set_regs(injection.tid, injection.saved)
    except ThreadGone:
        pass


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ThreadGone(f"process {pid} exited") from None


def stop_threads(pid: int, timeout: float = 2.0, already: dict[int, Stop] | None = None) -> dict[int, Stop]:
    """Seize and interrupt every thread of ``pid`` (until no new one appears) and wait for each stop.

    On failure every thread seized here is detached again before the error is raised.
    """
    stops: dict[int, Stop] = dict(already or {})
    seized: list[int] = []
    try:
        while True:
            fresh = [tid for tid in thread_ids(pid) if tid not in stops]
            if not fresh:
                break
            for tid in fresh:
                try:
                    seize(tid)
                    seized.append(tid)
                    interrupt(tid)
                except ThreadGone:
                    stops[tid] = Stop(tid, "exited")
            for tid in fresh:
                if tid not in stops:
                    stops[tid] = wait_stop(tid, timeout)
        if all(stop.kind == "exited" for stop in stops.values()):
            raise ThreadGone(f"process {pid} exited")
        return stops
    except BaseException:
        for tid in seized:
            if tid in stops:
                detach(stops[tid])
            else:
                _detach_running(tid)
        raise


def _detach_running(tid: int) -> None:
    """Detach a seized thread whose stop was not collected (PTRACE_DETACH needs a stopped tracee)."""
    try:
        interrupt(tid)
        detach(wait_stop(tid, 1.0))
    except TrackerError:
        pass  # it exited, or our own death will detach it


def release_threads(stops: dict[int, Stop]) -> None:
    """Detach every stopped thread, re-delivering the signals that arrived while it was stopped."""
    for stop in stops.values():
        detach(stop)


class Tracer:
    """Runs ptrace requests on one dedicated OS thread, so calls from any Python thread are safe.

    ``tracer.call(function, *args)`` runs any function of this module on that
    thread and returns its result (or raises its exception). The methods below
    are shortcuts. ``close()`` detaches nothing by itself: release what you
    stopped first; the thread's exit makes the kernel detach the rest.
    """

    def __init__(self, name: str = "pagepipe-ptrace"):
        _check_arch()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            function, args, kwargs, reply = request
            try:
                reply.put((True, function(*args, **kwargs)))
            except BaseException as exc:  # handed to the caller
                reply.put((False, exc))

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is self._thread:
            return function(*args, **kwargs)
        if not self._thread.is_alive():
            raise TrackerError("the ptrace thread has ended (Tracer closed)")
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((function, args, kwargs, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def stop_threads(self, pid: int, timeout: float = 2.0) -> dict[int, Stop]:
        return self.call(stop_threads, pid, timeout)

    def release_threads(self, stops: dict[int, Stop]) -> None:
        self.call(release_threads, stops)

    def inject_syscall(self, tid: int, number: int, arguments: Sequence[int] = (),
                       gadget: int | None = None) -> tuple[int, list[int]]:
        return self.call(inject_syscall, tid, number, arguments, gadget)

    def get_regs(self, tid: int) -> Regs:
        return self.call(get_regs, tid)

    def close(self) -> None:
        """End the ptrace thread (the kernel detaches whatever it still traces)."""
        if self._thread.is_alive():
            self._requests.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
