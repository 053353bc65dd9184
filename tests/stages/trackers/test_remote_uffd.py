"""RemoteUffd on a real child: written, dropped and re-mapped pages; what detach leaves."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from stages.trackers import ptrace, remote_uffd
from stages.trackers.remote_uffd import RemoteUffd, _pages_left, userfaultfd_descriptors

PAGE = os.sysconf("SC_PAGE_SIZE")

CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    SIZE = 1024 * mmap.PAGESIZE
    address = libc.mmap(None, SIZE, 3, 0x22, -1, 0)
    memory = (ctypes.c_char * SIZE).from_address(address)
    for page in range(512):
        memory[page * mmap.PAGESIZE] = b"\\x01"
    print(address, flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "write":
            for page in map(int, args):
                memory[page * mmap.PAGESIZE] = b"\\x07"
        elif command == "read":
            for page in map(int, args):
                memory[page * mmap.PAGESIZE]
        elif command == "drop":
            libc.madvise(address + int(args[0]) * mmap.PAGESIZE, int(args[1]) * mmap.PAGESIZE, 4)
        elif command == "remap":  # same place, a new mapping: no longer armed
            libc.munmap(address, SIZE)
            assert libc.mmap(address, SIZE, 3, 0x32, -1, 0) == address
            memory = (ctypes.c_char * SIZE).from_address(address)
        print("ok", flush=True)
""")


class Child:
    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.pid = self.process.pid
        self.address = int(self.process.stdout.readline())

    def do(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"

    def pages(self, addresses: np.ndarray) -> list[int]:
        return sorted(((addresses - np.uint64(self.address)) // np.uint64(PAGE)).astype(int).tolist())


@pytest.fixture
def attached():
    child = Child()
    tracer = ptrace.Tracer()
    uffd = RemoteUffd(child.pid, tracer)
    stops = tracer.stop_threads(child.pid)
    try:
        uffd.attach(stops)
        uffd.register(child.address, 1024 * PAGE)
    finally:
        tracer.release_threads(stops)

    def scan():
        stops = tracer.stop_threads(child.pid)
        try:
            return uffd.scan()
        finally:
            tracer.release_threads(stops)

    yield child, tracer, uffd, scan
    stops = tracer.stop_threads(child.pid)
    try:
        uffd.detach(stops)
    finally:
        tracer.release_threads(stops)
        uffd.close()
        tracer.close()
        child.process.kill()
        child.process.wait()


@pytest.mark.parametrize("compare_resident", [False, True])
def test_written_pages_and_dropped_pages_are_found_once(attached, monkeypatch, compare_resident):
    child, _, _, scan = attached
    if compare_resident:
        monkeypatch.setattr(remote_uffd, "_DROPPED_SHOW_AS_WRITTEN", False)
    first = scan()
    assert len(first.written) == 0 and len(first.dropped) == 0
    child.do("write 3 600 700")
    child.do("read 800 801")  # reading is not writing, even of never-touched pages
    child.do("drop 10 5")
    found = scan()
    changed = set(child.pages(found.written)) | set(child.pages(found.dropped))
    assert changed == {3, 600, 700, 10, 11, 12, 13, 14}
    child.do("write 10")
    again = scan()
    assert child.pages(again.written) == [10] and len(again.dropped) == 0


def test_a_mapping_replaced_at_the_same_place_is_reported_lost(attached):
    child, _, uffd, scan = attached
    child.do("remap")
    child.do("write 5")
    found = scan()
    assert found.lost == [(child.address, child.address + 1024 * PAGE)]
    assert uffd.armed == {}


def test_detach_closes_the_injected_descriptor_and_unregisters(attached):
    child, tracer, uffd, _ = attached
    assert userfaultfd_descriptors(child.pid) == [uffd.target_fd]
    stops = tracer.stop_threads(child.pid)
    try:
        uffd.detach(stops)
    finally:
        tracer.release_threads(stops)
    assert userfaultfd_descriptors(child.pid) == []
    with open(f"/proc/{child.pid}/smaps") as smaps:
        assert not any(line.startswith("VmFlags:") and " uw" in line for line in smaps)
    child.do("write 1")  # it runs on


def test_pages_left_lists_the_pages_no_longer_in_the_ranges():
    before = np.array([[0, 10 * PAGE], [20 * PAGE, 30 * PAGE]], dtype=np.uint64)
    now = np.array([[0, 4 * PAGE], [6 * PAGE, 10 * PAGE], [20 * PAGE, 29 * PAGE]], dtype=np.uint64)
    assert (_pages_left(before, now, PAGE) // PAGE).tolist() == [4, 5, 29]
    assert len(_pages_left(before, before, PAGE)) == 0
    assert (_pages_left(before, np.empty((0, 2), dtype=np.uint64), PAGE) // PAGE).tolist() == \
        list(range(10)) + list(range(20, 30))


def test_markers_of_processes_gone_are_pruned(tmp_path):
    alive = tmp_path / f"uffd-{os.getpid()}-{remote_uffd.start_time(os.getpid())}"
    reused = tmp_path / f"uffd-{os.getpid()}-1"  # same pid, another process (start time differs)
    gone = tmp_path / f"uffd-{2 ** 22 + 7}-123"
    other = tmp_path / "unrelated"
    for path in (alive, reused, gone, other):
        path.write_text("3")
    remote_uffd.prune_markers(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])
