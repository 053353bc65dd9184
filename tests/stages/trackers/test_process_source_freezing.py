"""process-src stops its targets so that they always run on: pagepipe killed mid-pause, foreign tracers, timing."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.batch import Flag
from pipeline.errors import TrackerError
from pipeline.stage import StageContext
from stages.trackers.freezer import PtraceFreezer
from stages.trackers.procmem import thread_states
from stages.trackers.process import ProcessSource
from test_process_source import Child, child, next_epoch, started  # noqa: F401

HELD_PAUSE = textwrap.dedent("""
    import sys, time
    from pipeline.stage import StageContext
    from stages.trackers.process import ProcessSource

    class HeldPause(ProcessSource):
        '''Holds the second checkpoint's pause until killed.'''
        def _paused(self, members, everything):
            snapshot = super()._paused(members, everything)
            if self.counters.get("checkpoints") == 1:
                print("paused", self.freezer.method, flush=True)
                time.sleep(600)
            return snapshot

    source = HeldPause(pid=int(sys.argv[1]), interval=0)
    source.start(StageContext("process-src", post=lambda kind, **f: print(kind, f.get("message", ""), flush=True)))
    for batch in source.produce():
        pass
""")

FOREIGN_TRACER = textwrap.dedent("""
    import os, sys
    from stages.trackers import ptrace
    pid = int(sys.argv[1])
    tids = ptrace.thread_ids(pid)
    for tid in tids:
        ptrace.seize(tid)
    print("tracing", flush=True)
    while True:  # what strace does: pass every stop on
        try:
            tid, status = os.waitpid(-1, 0x40000000)
        except ChildProcessError:
            break
        stop = ptrace._decode(tid, status)
        if stop.kind != "exited":
            ptrace.resume(stop)
""")


def is_stopped(pid: int) -> bool:
    return bool(set(thread_states(pid)) & set("Tt"))


def assert_runs_on(child: Child, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while is_stopped(child.process.pid):
        assert time.monotonic() < deadline, f"pid {child.process.pid} left stopped: {thread_states(child.process.pid)}"
        time.sleep(0.01)
    assert child.command("write 0 1 77") == "ok", "the target makes progress"


def held_pause(child: Child) -> subprocess.Popen:
    """A process running process-src on the child, inside its second pause (the child stopped)."""
    holder = subprocess.Popen([sys.executable, "-c", HELD_PAUSE, str(child.process.pid)], stdout=subprocess.PIPE,
                              text=True)
    for line in holder.stdout:
        if line.startswith("paused"):
            holder.method = line.split()[1]
            return holder
    holder.wait(timeout=10)
    raise AssertionError(f"process-src never paused (exit {holder.returncode})")


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_target_runs_on_when_pagepipe_is_killed_mid_pause(child, kill):
    holder = held_pause(child)
    try:
        assert holder.method == "ptrace" and is_stopped(child.process.pid), "stopped during the pause"
        holder.send_signal(kill)
        holder.wait(timeout=10)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert_runs_on(child)


def test_a_target_someone_else_traces_is_stopped_by_signal_with_a_guardian(child):
    tracer = subprocess.Popen([sys.executable, "-c", FOREIGN_TRACER, str(child.process.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "tracing"
        warnings = []
        source = ProcessSource(pid=child.process.pid, interval=0, checkpoints=2)
        source.start(StageContext("process-src", post=lambda kind, **f: warnings.append(f.get("message", ""))))
        try:
            batches = list(source.produce())
        finally:
            source.stop()
        assert [b.epoch for b in batches if b.flags & Flag.EPOCH_END] == [1, 2]
        assert any(f"already traced by pid {tracer.pid}" in w and "SIGSTOP" in w for w in warnings), warnings
        assert_runs_on(child)
        holder = held_pause(child)
        try:
            assert holder.method == "signal" and is_stopped(child.process.pid)
            holder.kill()
            holder.wait(timeout=10)
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        assert_runs_on(child)
    finally:
        tracer.kill()
        tracer.wait()
        tracer.stdout.close()


def test_without_ptrace_permission_the_error_says_how_to_get_it(child):
    if os.getuid() != 0:
        pytest.skip("needs root to run a part of the test as another user")
    read_end, write_end = os.pipe()
    helper = os.fork()
    if helper == 0:  # as user nobody, try to stop root's child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            freezer = PtraceFreezer(2.0)
            try:
                freezer.freeze(lambda: [child.process.pid])
                message = "stopped"
            except TrackerError as exc:
                message = str(exc)
            freezer.close()
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        message = answer.read()
    os.waitpid(helper, 0)
    assert f"cannot stop pid {child.process.pid} with ptrace" in message
    for hint in ("same user", "root", "CAP_SYS_PTRACE", "/proc/sys/kernel/yama/ptrace_scope"):
        assert hint in message
    assert not is_stopped(child.process.pid)


def test_threads_that_start_and_end_during_checkpoints_are_all_stopped(child):
    assert child.command("churn_threads") == "ok"
    source = ProcessSource(pid=child.process.pid, interval=0.002, checkpoints=40)
    with started(source) as stream:
        batches = list(stream)
    assert len([b for b in batches if b.flags & Flag.EPOCH_END]) == 40
    assert_runs_on(child)


def test_a_failed_checkpoint_says_the_target_was_resumed(child):
    class Failing(ProcessSource):
        def _paused(self, members, everything):
            assert is_stopped(child.process.pid)
            raise TrackerError("injected failure")

    source = Failing(pid=child.process.pid, interval=0, name="src")
    with started(source) as stream:
        with pytest.raises(TrackerError, match=f"src: checkpoint of epoch 1 failed: injected failure "
                                               f"\\(pid {child.process.pid} resumed\\)"):
            next(stream)
    assert_runs_on(child)


def test_a_checkpoint_slower_than_the_interval_still_leaves_min_run_between_pauses(child):
    class Slow(ProcessSource):
        def _paused(self, members, everything):
            time.sleep(0.04)
            return super()._paused(members, everything)

    source = Slow(pid=child.process.pid, interval=0.01, min_run=0.03, checkpoints=6)
    with started(source) as stream:
        ends = [b for b in stream if b.flags & Flag.EPOCH_END]
    assert len(ends) == 6
    for before, after in zip(ends, ends[1:]):
        resumed = before.meta["time"] + before.meta["pause_ms"] / 1e3
        assert after.meta["time"] - resumed >= 0.03 - 0.002, "the target ran at least min-run between pauses"
    stopped = sum(end.meta["pause_ms"] for end in ends[:-1]) / 1e3
    fraction = source.counters["stopped_fraction"]
    assert 0 < fraction < 1 and source.counters["stopped_seconds"] >= stopped
    elapsed = ends[-1].meta["time"] - ends[0].meta["time"]
    assert fraction <= (stopped + ends[-1].meta["pause_ms"] / 1e3) / elapsed + 0.05
    steady = sorted(end.meta["pause_ms"] for end in ends[1:])  # the first, full checkpoint counted apart
    assert source.counters["pause_ms_median"] == pytest.approx(steady[2], rel=0.01)
    assert steady[3] <= source.counters["pause_ms_p99"] <= steady[-1]


def test_min_run_defaults_to_half_the_interval():
    assert ProcessSource(pid=1, interval=0.04).min_run_seconds == pytest.approx(0.02)
    assert ProcessSource(pid=1, interval=0.04, min_run="5ms").min_run_seconds == pytest.approx(0.005)


RUNNING = textwrap.dedent("""
    import sys
    from pipeline.stage import StageContext
    from stages.trackers.process import ProcessSource

    source = ProcessSource(pid=int(sys.argv[1]), interval=0, copy=sys.argv[2])
    source.start(StageContext("process-src"))
    print("started", flush=True)
    for batch in source.produce():
        pass
""")


def test_killing_pagepipe_at_random_moments_never_leaves_the_target_stopped(child):
    """15 kills (SIGKILL or SIGTERM) at random moments of a process-src checkpointing back to back, the start-up
    included: the target always runs on (``pagepipe bench kill_campaign`` does this to whole pipelines)."""
    rng = random.Random(8)
    for run in range(15):
        holder = subprocess.Popen([sys.executable, "-c", RUNNING, str(child.process.pid), rng.choice(["all", "changed"])],
                                  stdout=subprocess.PIPE, text=True)
        try:
            if rng.random() < 0.8:
                holder.stdout.readline()  # most kills once checkpoints run, the others during the start-up
            time.sleep(rng.uniform(0, 0.1))
            holder.send_signal(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            holder.wait(timeout=10)
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        assert_runs_on(child)


def test_a_target_someone_else_stopped_is_checkpointed_and_left_stopped(child):
    os.kill(child.process.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while set(thread_states(child.process.pid)) != {"T"}:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    source = ProcessSource(pid=child.process.pid, interval=0, checkpoints=3)
    with started(source) as stream:
        batches = list(stream)
    assert [b.epoch for b in batches if b.flags & Flag.EPOCH_END] == [1, 2, 3]
    time.sleep(0.1)
    assert set(thread_states(child.process.pid)) == {"T"}, "still stopped, as its owner wants"
    os.kill(child.process.pid, signal.SIGCONT)
    assert_runs_on(child)
