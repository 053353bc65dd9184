"""process-src mode=uffd on real programs: the kernel's written pages replicate a changing process exactly,
and nothing of ours is left in the target afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.pipeline import Pipeline
from stages.common.replica_store import load_replica, read_manifest, region_keys
from stages.trackers import remote_uffd
from stages.trackers.procmem import thread_states
from stages.trackers.remote_uffd import marker_directory, start_time, userfaultfd_descriptors

PAGE = os.sysconf("SC_PAGE_SIZE")

# Writes pages, grows and shrinks its heap, maps and unmaps, drops pages with MADV_DONTNEED, mremaps, all
# the time, from two threads; optionally watches one mapping with its own userfaultfd first.
CHANGING = textwrap.dedent("""
    import ctypes, mmap, os, random, sys, threading, time
    PAGE = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.syscall.restype = ctypes.c_long
    own_uffd = sys.argv[1] == "own-uffd"
    if sys.argv[1] == "no-uffd":  # a seccomp filter makes userfaultfd() fail with EPERM, as in a sandbox
        class Filter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                        ("k", ctypes.c_uint32)]
        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]
        rules = (Filter * 4)(Filter(0x20, 0, 0, 0), Filter(0x15, 0, 1, 323), Filter(0x06, 0, 0, 0x00050001),
                             Filter(0x06, 0, 0, 0x7FFF0000))
        program = Program(4, rules)
        assert libc.prctl(38, 1, 0, 0, 0) == 0
        assert libc.prctl(22, 2, ctypes.byref(program), 0, 0) == 0, ctypes.get_errno()
    base = mmap.mmap(-1, 2048 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base[:] = bytes(range(256)) * (len(base) // 256)
    address = ctypes.addressof(ctypes.c_char.from_buffer(base))
    watched = None
    if own_uffd:  # the target's own userfaultfd, registered on a mapping of its own (async write-protect)
        class Api(ctypes.Structure):
            _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]
        class Register(ctypes.Structure):
            _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                        ("ioctls", ctypes.c_uint64)]
        fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK | 1)
        assert fd >= 0, ctypes.get_errno()
        libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        api = Api(0xAA, 1 << 15)
        assert libc.ioctl(fd, 0xC018AA3F, ctypes.byref(api)) == 0
        watched = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        watched[:] = b"w" * len(watched)
        start = ctypes.addressof(ctypes.c_char.from_buffer(watched))
        register = Register(start, len(watched), 2, 0)
        assert libc.ioctl(fd, 0xC020AA00, ctypes.byref(register)) == 0, ctypes.get_errno()
    maps, blocks = [], []
    lock = threading.Lock()

    def writer(seed):
        rng = random.Random(seed)
        while True:
            with lock:
                for _ in range(20):
                    page = rng.randrange(2048)
                    base[page * PAGE + rng.randrange(PAGE)] = rng.randrange(256)
                if watched is not None:
                    watched[rng.randrange(len(watched))] = rng.randrange(256)
            time.sleep(0.0005)

    threading.Thread(target=writer, args=(1,), daemon=True).start()
    print("ready", flush=True)
    rng = random.Random(2)
    while True:
        with lock:
            action = rng.randrange(6)
            if action == 0 and len(blocks) < 200:  # heap growth (small blocks: brk) and big blocks (mmap)
                size = rng.choice([64, 4096, 300 * 1024])
                block = libc.malloc(size)
                ctypes.memset(block, rng.randrange(1, 256), size)
                blocks.append(block)
            elif action == 1 and blocks:  # heap shrinks
                libc.free(blocks.pop(rng.randrange(len(blocks))))
            elif action == 2 and len(maps) < 8:
                m = mmap.mmap(-1, rng.randrange(1, 64) * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                m[:] = bytes([rng.randrange(1, 256)]) * len(m)
                maps.append(m)
            elif action == 3 and maps:
                maps.pop(rng.randrange(len(maps))).close()
            elif action == 4:  # pages dropped: they read as zeros afterwards
                first = rng.randrange(2040)
                libc.madvise(address + first * PAGE, rng.randrange(1, 8) * PAGE, 4)
            elif action == 5 and maps:  # mremap: a mapping grows (may move) or shrinks
                m = maps[rng.randrange(len(maps))]
                old = len(m)
                m.resize(rng.randrange(1, 64) * PAGE)
                if len(m) > old:
                    m[old:] = bytes([rng.randrange(1, 256)]) * (len(m) - old)
        time.sleep(0.001)
""")


class Changing:
    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-c", CHANGING, *(args or ("plain",))],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"
        self.pid = self.process.pid

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def changing():
    child = Changing()
    yield child
    child.close()


def read_memory(pid: int, address: int, nbytes: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(nbytes)


def replicate(pid: int, tmp_path: Path, extra: str = "", checkpoints: int = 25, timeout: float = 300,
              interval: str = "10ms"):
    """process-src -> frame -> file, then file -> replica-sink; returns the run's result and the replica."""
    stream, replica = tmp_path / "stream", tmp_path / "replica"
    result = Pipeline.parse(f"process-src name=src pid={pid} interval={interval} checkpoints={checkpoints} {extra} "
                            f"! frame ! file-sink path={stream}").run(mode="inline", timeout=timeout)
    Pipeline.parse(f"file-src path={stream} ! deframe ! decode ! replica-sink path={replica} fsync=false").run(
        mode="inline", timeout=timeout)
    return result, replica


def assert_replica_equals_memory(replica: Path, pid: int) -> int:
    manifest = read_manifest(replica)
    memory = load_replica(replica)
    compared = 0
    for key, region in zip(region_keys(tuple(manifest["regions"])), manifest["regions"]):
        live = read_memory(pid, region["start"], region["npages"] * PAGE)
        if memory[key].tobytes() != live:
            differ = np.flatnonzero(memory[key] != np.frombuffer(live, dtype=np.uint8)) // PAGE
            raise AssertionError(f"region {key}: pages {sorted(set(differ.tolist()))[:10]} differ")
        compared += region["npages"]
    return compared


def warnings_of(result) -> list[str]:
    return [message.fields.get("message", "") for message in result.warnings]


@pytest.mark.parametrize("dropped_found_by", ["written-scan", "resident-compare"])
def test_a_changing_process_replicates_exactly_and_later_pauses_read_only_written_pages(changing, tmp_path,
                                                                                          monkeypatch,
                                                                                          dropped_found_by):
    if dropped_found_by == "resident-compare":  # as on a kernel whose written scan misses MADV_DONTNEED'd pages
        monkeypatch.setattr(remote_uffd, "_DROPPED_SHOW_AS_WRITTEN", False)
    result, replica = replicate(changing.pid, tmp_path, "mode=uffd stop-at-end=true")
    assert set(thread_states(changing.pid)) == {"T"}, "left stopped at the end"
    try:
        compared = assert_replica_equals_memory(replica, changing.pid)
        assert compared > 2048
        stats = result.statistics[("src", 0)]["counters"]
        assert stats["armed_pages"] >= 2048
        assert 0 < stats["written_pages"] < stats["armed_pages"] / 4, "a pause reads the written pages, not all"
    finally:
        os.kill(changing.pid, signal.SIGCONT)


def test_nothing_of_ours_is_left_in_a_target_that_runs_on(changing, tmp_path):
    result, replica = replicate(changing.pid, tmp_path, "mode=uffd", checkpoints=8)
    assert userfaultfd_descriptors(changing.pid) == []
    marker = Path(marker_directory()) / f"uffd-{changing.pid}-{start_time(changing.pid)}"
    assert not marker.exists()
    with open(f"/proc/{changing.pid}/smaps") as smaps:
        flags = [line for line in smaps if line.startswith("VmFlags:")]
    assert flags and not any(" uw" in line for line in flags), "no mapping left registered for write-protect"
    assert "TracerPid:\t0" in open(f"/proc/{changing.pid}/status").read()
    assert set(thread_states(changing.pid)) <= set("RS")
    assert changing.process.poll() is None


def test_a_descriptor_left_by_a_killed_run_is_closed_by_the_next(changing, tmp_path):
    command = ["pagepipe", "launch", f"process-src pid={changing.pid} mode=uffd interval=10ms ! null-sink"]
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not userfaultfd_descriptors(changing.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # pagepipe and its workers, as a crash would
        killed.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (set(thread_states(changing.pid)) <= set("RS") and "TracerPid:\t0"
                                               in open(f"/proc/{changing.pid}/status").read()):
        time.sleep(0.05)
    assert changing.process.poll() is None and set(thread_states(changing.pid)) <= set("RS")
    stale = userfaultfd_descriptors(changing.pid)
    assert len(stale) == 1, "the killed run's descriptor is still in the target (harmless: async write-protect)"
    result, _ = replicate(changing.pid, tmp_path, "mode=uffd", checkpoints=3)
    assert any(f"closed userfaultfd {stale}" in w for w in warnings_of(result)), warnings_of(result)
    assert userfaultfd_descriptors(changing.pid) == []


def test_ranges_the_target_watches_itself_are_digested(tmp_path):
    child = Changing("own-uffd")
    try:
        own = userfaultfd_descriptors(child.pid)
        assert len(own) == 1
        result, replica = replicate(child.pid, tmp_path, "mode=uffd stop-at-end=true", checkpoints=12)
        try:
            assert_replica_equals_memory(replica, child.pid)
            assert any("registered with the target's own userfaultfd" in w for w in warnings_of(result)), \
                warnings_of(result)
        finally:
            os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.2)
        assert own[0] in userfaultfd_descriptors(child.pid), "the target's own descriptor is never touched"
    finally:
        child.close()


@pytest.mark.parametrize("mode", ["auto", "uffd"])
def test_a_target_that_cannot_create_a_userfaultfd(tmp_path, mode):
    child = Changing("no-uffd")
    try:
        if mode == "uffd":
            with pytest.raises(Exception, match="mode=uffd: pid .*userfaultfd.* failed: Operation not permitted"):
                replicate(child.pid, tmp_path, "mode=uffd", checkpoints=3)
        else:
            result, replica = replicate(child.pid, tmp_path, "mode=auto stop-at-end=true", checkpoints=5)
            try:
                assert any("finding changed pages by digest (mode=auto)" in w and "Operation not permitted" in w
                           for w in warnings_of(result)), warnings_of(result)
                assert_replica_equals_memory(replica, child.pid)
            finally:
                os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.1)
        assert child.process.poll() is None and userfaultfd_descriptors(child.pid) == []
        assert set(thread_states(child.pid)) <= set("RS")
    finally:
        child.close()
