"""ptrace primitives on real children: stop, inject, resume, and survival of the tracer's death."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest

from stages.trackers import ptrace
from stages.trackers.procmem import thread_states

# Prints a tick every 5 ms from two threads, so progress (or its absence) is visible.
TICKER = textwrap.dedent("""
    import os, threading, time
    def tick(tag):
        while True:
            os.write(1, tag)
            time.sleep(0.005)
    threading.Thread(target=tick, args=(b"b",), daemon=True).start()
    tick(b"a")
""")


class Ticker:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", TICKER], stdout=subprocess.PIPE)
        self.pid = self.process.pid
        assert self.ticks(10.0), "the child never ticked"

    def ticks(self, timeout: float) -> bytes:
        """The ticks that arrive within ``timeout`` s (at least one, if any comes)."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return os.read(self.process.stdout.fileno(), 65536) if ready else b""

    def drain(self) -> None:
        while self.ticks(0.05):
            pass

    def close(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def child():
    ticker = Ticker()
    yield ticker
    ticker.close()


@pytest.fixture
def tracer():
    with ptrace.Tracer() as tracer:
        yield tracer


def test_stop_threads_stops_every_thread_and_release_lets_them_run(child, tracer):
    stops = tracer.stop_threads(child.pid)
    try:
        assert len(stops) >= 2 and all(stop.kind in ("interrupt", "signal") for stop in stops.values())
        assert set(thread_states(child.pid)) == {"t"}
        child.drain()
        assert child.ticks(0.3) == b"", "a stopped child ticked"
    finally:
        tracer.release_threads(stops)
    got = b"".join(child.ticks(5.0) for _ in range(20))
    assert b"a" in got and b"b" in got, "both threads run again after release"
    assert "0" == open(f"/proc/{child.pid}/status").read().split("TracerPid:")[1].split()[0]


@pytest.mark.parametrize("use_gadget", [True, False], ids=["vdso-gadget", "patched-code"])
def test_inject_syscall_runs_it_in_the_target_and_restores_state(child, tracer, use_gadget):
    gadget = ptrace.find_syscall_instruction(child.pid) if use_gadget else None
    if use_gadget and gadget is None:
        pytest.skip("no syscall instruction in this process's vdso")
    stops = tracer.stop_threads(child.pid)
    try:
        tid = child.pid
        before = tracer.get_regs(tid)
        word = tracer.call(ptrace.peek, tid, before.rip)
        result, _ = tracer.inject_syscall(tid, 39, (), gadget)  # getpid
        assert result == child.pid
        result, _ = tracer.inject_syscall(tid, 110, (), gadget)  # getppid
        assert result == os.getpid()
        result, _ = tracer.inject_syscall(tid, 3, (987654,), gadget)  # close of a bad fd: -EBADF
        assert result == -9
        after = tracer.get_regs(tid)
        assert bytes(after) == bytes(before)
        assert tracer.call(ptrace.peek, tid, before.rip) == word
    finally:
        tracer.release_threads(stops)
    assert child.ticks(5.0), "the child runs on after the injection"
    assert child.process.poll() is None


def test_calls_from_any_python_thread_go_through_the_tracer_thread(child, tracer):
    import threading
    results = {}

    def stop_and_release():
        stops = tracer.stop_threads(child.pid)
        results["regs"] = tracer.get_regs(child.pid)
        tracer.release_threads(stops)

    worker = threading.Thread(target=stop_and_release)
    worker.start()
    worker.join(30)
    assert results["regs"].rsp != 0
    assert child.ticks(5.0)


def test_direct_request_from_another_thread_is_refused(child, tracer):
    stops = tracer.stop_threads(child.pid)
    try:
        with pytest.raises(ptrace.ThreadGone):  # ESRCH: this thread is not the tracer
            ptrace.get_regs(child.pid)
    finally:
        tracer.release_threads(stops)


def test_a_group_stopped_target_stays_stopped_after_release(child, tracer):
    os.kill(child.pid, signal.SIGSTOP)
    try:
        for _ in range(2000):
            if set(thread_states(child.pid)) == {"T"}:
                break
            select.select([], [], [], 0.005)
        stops = tracer.stop_threads(child.pid)
        assert any(stop.kind == "group" for stop in stops.values())
        tracer.release_threads(stops)
        child.drain()
        assert child.ticks(0.3) == b"", "released from ptrace, it must stay SIGSTOPped"
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert child.ticks(5.0)


def test_the_target_survives_sigkill_of_its_tracer(child):
    tracer_script = textwrap.dedent(f"""
        import sys, time
        from stages.trackers import ptrace
        tracer = ptrace.Tracer()
        tracer.stop_threads({child.pid})
        print("stopped", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", tracer_script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "stopped"
        assert set(thread_states(child.pid)) == {"t"}
        child.drain()
        assert child.ticks(0.3) == b""
        process.kill()
        process.wait()
        assert child.ticks(5.0), "the child must run again once its tracer is killed"
        assert child.process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_seizing_a_process_that_does_not_exist_says_so(tracer):
    with pytest.raises(ptrace.ThreadGone):
        tracer.stop_threads(2 ** 22 + 12345)


def test_a_blocking_call_interrupted_by_the_injection_is_restarted(tracer):
    # read(2) through ctypes: no retry in Python, so a broken restart would show as -1 / errno 512.
    script = textwrap.dedent("""
        import ctypes, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        r, w = int(sys.argv[1]), int(sys.argv[2])
        os.write(1, b"ready\\n")
        buffer = ctypes.create_string_buffer(1)
        got = libc.read(r, buffer, 1)
        os.write(1, f"{got} {ctypes.get_errno()} {buffer.raw!r}\\n".encode())
    """)
    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", script, str(r), str(w)], stdout=subprocess.PIPE,
                             pass_fds=(r, w))
    try:
        assert child.stdout.readline() == b"ready\n"
        for _ in range(1000):  # until it sleeps in read()
            if open(f"/proc/{child.pid}/wchan").read() not in ("", "0"):
                break
            select.select([], [], [], 0.002)
        stops = tracer.stop_threads(child.pid)
        try:
            assert tracer.inject_syscall(child.pid, 39, (), ptrace.find_syscall_instruction(child.pid))[0] == child.pid
        finally:
            tracer.release_threads(stops)
        select.select([], [], [], 0.1)
        os.write(w, b"x")
        assert child.stdout.readline().strip() == b"1 0 b'x'"
    finally:
        child.kill()
        child.wait()
        os.close(r)
        os.close(w)
