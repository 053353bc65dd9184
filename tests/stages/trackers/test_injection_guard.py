"""Guarded syscall injection: a tracer killed inside the injection never leaves the target running on our
registers, nor stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from stages.trackers import injection_guard, ptrace
from stages.trackers.procmem import thread_states
from stages.trackers.remote_uffd import userfaultfd_descriptors
from test_ptrace import Ticker

# A tracer that stops the ticker and enters a guarded userfaultfd() injection, then hangs at ``where``.
STUCK_TRACER = textwrap.dedent("""
    import sys, time
    from stages.trackers import injection_guard, ptrace
    pid, where, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def stuck(tid, number, arguments, gadget, injection):
        regs = injection.saved.copy()
        regs.rax, regs.orig_rax, regs.rdi = number, 2 ** 64 - 1, arguments[0]
        regs.rip = gadget if gadget is not None else regs.rip
        ptrace.set_regs(tid, regs)
        if where == "after-call":
            ptrace._resume_until(tid, ptrace.PTRACE_SYSCALL, ("syscall",), [])
            ptrace._resume_until(tid, ptrace.PTRACE_SYSCALL, ("syscall",), [])
        print("in-window", flush=True)
        time.sleep(120)

    injection_guard.ptrace.inject_syscall = stuck
    tracer = ptrace.Tracer()
    stops = tracer.stop_threads(pid)
    guardian = injection_guard.Guardian()
    tracer.call(injection_guard.guarded_inject, guardian, pid, stops[pid], 323, (0o2004001,), marker)
""")


@pytest.fixture
def child():
    ticker = Ticker()
    yield ticker
    ticker.close()


@pytest.mark.parametrize("where", ["before-call", "after-call"])
def test_sigkill_inside_the_injection_window_restores_the_target(child, tmp_path, where):
    marker = str(tmp_path / "marker")
    tracer = subprocess.Popen([sys.executable, "-c", STUCK_TRACER, str(child.pid), where, marker],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "in-window"
        regs_file = f"/proc/{child.pid}/syscall"
        tracer.kill()
        tracer.wait()
        got = b"".join(child.ticks(5.0) for _ in range(10))
        assert b"a" in got and b"b" in got, "the target must run on after its tracer died mid-injection"
        assert child.process.poll() is None, "the target must survive (registers restored)"
        assert "T" not in thread_states(child.pid) and "t" not in thread_states(child.pid)
        assert os.path.exists(regs_file)
        if where == "after-call":  # the guardian noted the descriptor the call created, for the next attach
            fd = int(open(marker).read())
            assert fd in userfaultfd_descriptors(child.pid)
        else:
            assert not os.path.exists(marker)
            assert userfaultfd_descriptors(child.pid) == []
    finally:
        tracer.kill()
        tracer.wait()


def test_guarded_injection_returns_and_leaves_the_target_running(child):
    with ptrace.Tracer() as tracer:
        guardian = injection_guard.Guardian()
        stops = tracer.stop_threads(child.pid)
        try:
            result = tracer.call(injection_guard.guarded_inject, guardian, child.pid, stops[child.pid], 39, ())
            assert result == child.pid
            assert set(thread_states(child.pid)) == {"t"}, "still held by the freezer after the injection"
        finally:
            tracer.release_threads(stops)
            guardian.close()
    got = b"".join(child.ticks(5.0) for _ in range(10))
    assert b"a" in got and b"b" in got
    status = open(f"/proc/{child.pid}/status").read()
    assert "TracerPid:\t0" in status


def test_a_target_stopped_by_someone_else_stays_stopped(child):
    os.kill(child.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while set(thread_states(child.pid)) != {"T"} and time.monotonic() < deadline:
            time.sleep(0.005)
        with ptrace.Tracer() as tracer:
            guardian = injection_guard.Guardian()
            stops = tracer.stop_threads(child.pid)
            try:
                assert stops[child.pid].kind == "group"
                assert tracer.call(injection_guard.guarded_inject, guardian, child.pid, stops[child.pid], 39,
                                   ()) == child.pid
            finally:
                tracer.release_threads(stops)
                guardian.close()
        child.drain()
        assert child.ticks(0.3) == b"", "the owner's SIGSTOP must still hold"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert child.ticks(5.0)
