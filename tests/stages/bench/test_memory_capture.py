"""Capturing real process memory: stop/read/resume, changed-page detection, spawned workloads, the saved trace."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from stages.bench.capture_memory import (PAGE_SIZE, MemcachedLoad, Region, capture, changed_pages, free_port, main,
                                       read_regions, spawned_memcached, spawned_python, stopped, writable_regions)
from stages.bench.realmemory import load_trace_pairs
from pipeline.errors import ConfigError, TrackerError
from stages.trackers.procmem import process_state

MARKER = b"pagepipe-capture-marker-"


@pytest.fixture
def marked_process():
    """A Python child holding 64 pages of a known pattern in its heap, then idling."""
    code = (f"import sys, time\nheld = bytearray({MARKER!r} * {64 * PAGE_SIZE // len(MARKER)})\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        yield child.pid
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_changed_pages_names_exactly_the_differing_pages():
    previous = np.zeros((9000, 16), dtype=np.uint8)
    current = previous.copy()
    current[[3, 4500, 8999], [0, 7, 15]] = 1
    found = changed_pages(previous, current)
    assert found.dtype == np.uint64 and found.tolist() == [3, 4500, 8999]


def test_process_is_resumed_even_when_the_block_fails(marked_process):
    with pytest.raises(RuntimeError):
        with stopped(marked_process):
            assert process_state(marked_process) in "Tt"
            raise RuntimeError("failure while stopped")
    deadline = time.monotonic() + 5
    while process_state(marked_process) in "Tt" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_state(marked_process) not in "Tt"


def test_every_thread_is_stopped_inside_the_block():
    code = ("import threading, time\n"
            "def spin():\n    while True: pass\n"
            "for _ in range(3): threading.Thread(target=spin, daemon=True).start()\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        with stopped(child.pid):
            tasks = os.listdir(f"/proc/{child.pid}/task")
            states = [open(f"/proc/{child.pid}/task/{task}/stat").read().rsplit(")", 1)[1].split()[0] for task in tasks]
        assert len(tasks) == 4 and set(states) == {"T"}
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_reads_what_a_live_process_holds_in_memory(marked_process):
    regions = writable_regions(marked_process)
    assert regions and all(r.npages >= 0 for r in regions)
    snapshot = np.empty((sum(r.npages for r in regions), PAGE_SIZE), dtype=np.uint8)
    with stopped(marked_process):
        assert read_regions(marked_process, regions, snapshot) == 0
    assert snapshot.tobytes().count(MARKER * 8) >= 64 * PAGE_SIZE // len(MARKER * 8) - 2


def test_unmapped_pages_read_as_zeros_and_are_counted(marked_process):
    snapshot = np.full((2, PAGE_SIZE), 0xAA, dtype=np.uint8)
    with stopped(marked_process):
        unreadable = read_regions(marked_process, [Region(start=PAGE_SIZE, npages=2)], snapshot)
    assert unreadable == 2 and not snapshot.any()


def test_capture_refuses_more_memory_than_allowed_and_leaves_process_running(marked_process):
    with pytest.raises(TrackerError, match="exceeds the limit"):
        capture(marked_process, snapshots=2, interval=0.01, max_bytes=PAGE_SIZE)
    assert process_state(marked_process) not in "Tt"


def test_vanished_process_is_a_tracker_error():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(TrackerError, match=f"process {child.pid}"):
        capture(child.pid, snapshots=2, interval=0.01)


def test_python_workload_capture_replays_into_the_saved_trace(tmp_path):
    with spawned_python(seconds=20, keys=5000) as pid:
        time.sleep(0.5)
        trace = capture(pid, snapshots=3, interval=0.02)
    assert not _alive(pid)
    assert len(trace.epochs) == 2 and trace.base.shape[0] == sum(r.npages for r in trace.regions)
    pages, data = trace.epochs[0]
    assert pages.size > 0 and data.shape == (pages.size, PAGE_SIZE)
    assert (trace.base[pages.astype(np.intp)] != data).any(axis=1).all()  # only changed pages are recorded
    trace.save(tmp_path / "python.npz")
    pairs = load_trace_pairs(tmp_path / "python.npz")
    assert pairs.npages == sum(p.size for p, _ in trace.epochs)
    np.testing.assert_array_equal(pairs.current[: pages.size], data)


@pytest.mark.skipif(shutil.which("memcached") is None, reason="memcached not installed")
def test_memcached_under_load_changes_pages_and_is_stopped_afterwards():
    with spawned_memcached(16, MemcachedLoad(port=free_port(), keys=2000, fill_value_bytes=500)) as pid:
        trace = capture(pid, snapshots=2, interval=0.05)
    assert not _alive(pid)
    assert trace.base.nbytes > 0 and trace.epochs[0][0].size > 0


def test_command_line_captures_a_running_process(marked_process, tmp_path):
    out = tmp_path / "marked.npz"
    assert main(["--pid", str(marked_process), "--out", str(out), "--snapshots", "2", "--interval", "10ms"]) == 0
    assert load_trace_pairs(out).page_size == PAGE_SIZE
    assert process_state(marked_process) not in "Tt"


def test_unwritable_output_is_reported_and_process_left_running(marked_process, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "trace.npz"
    assert main(["--pid", str(marked_process), "--out", str(out), "--snapshots", "2", "--interval", "1ms"]) == 2
    assert process_state(marked_process) not in "Tt"


def test_memcached_load_rejects_value_sizes_it_cannot_send():
    with pytest.raises(ConfigError, match="value sizes"):
        MemcachedLoad(port=1, fill_value_bytes=1 << 20)


def test_command_line_rejects_a_single_snapshot(marked_process, tmp_path):
    assert main(["--pid", str(marked_process), "--out", str(tmp_path / "x.npz"), "--snapshots", "1"]) == 2
    assert not (tmp_path / "x.npz").exists()
