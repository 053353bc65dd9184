"""process-src reading another process's memory: short reads resumed, refused pages never sent as zeros."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline.errors import TrackerError
from stages.trackers import procmem
from stages.trackers.procmem import read_pages, thread_states
from stages.trackers.process import PAGE_SIZE, ProcessSource
from test_process_source import COPY_MODES, Child, child, next_epoch, page_number_of, started  # noqa: F401
from tracker_streams import replay

GiB = 1 << 30

BIG_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    size = int(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    address = libc.mmap(None, size, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), 14)  # MADV_NOHUGEPAGE: 4 KiB zero pages
    if libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(size), 22):  # MADV_POPULATE_READ: zero pages
        raise SystemExit("MADV_POPULATE_READ failed")
    for page in map(int, sys.argv[2:]):
        ctypes.memset(address + page * mmap.PAGESIZE, page % 251 + 1, mmap.PAGESIZE)
    print(address, flush=True)
    sys.stdin.read()
""")


def live_memory(pid: int, address: int, nbytes: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(nbytes)


def test_reads_cut_into_calls_of_any_size_equal_the_process_memory(child):
    address = child.map(40, 3)
    for page in range(0, 40, 3):
        assert child.command(f"write 1 {page} {page + 10}") == "ok"
    runs = [(address, 7, 0), (address + 9 * PAGE_SIZE, 20, 7), (address + 35 * PAGE_SIZE, 5, 27)]
    expected = b"".join(live_memory(child.process.pid, start, npages * PAGE_SIZE) for start, npages, _ in runs)
    for limit in (PAGE_SIZE, 3 * PAGE_SIZE + 100, 64 * PAGE_SIZE):
        out = np.zeros((32, PAGE_SIZE), dtype=np.uint8)
        assert read_pages(child.process.pid, runs, PAGE_SIZE, out, max_call_bytes=limit) == []
        assert out.tobytes() == expected, f"calls of at most {limit} bytes"


def test_a_refused_page_is_named_and_the_read_goes_on_past_it(child):
    start = int(child.command("past_eof"))  # 3 pages over a 1-page file: pages 2 and 3 are refused
    after = child.map(4, 9)
    out = np.full((7, PAGE_SIZE), 0xAA, dtype=np.uint8)
    refused = read_pages(child.process.pid, [(start, 3, 0), (after, 4, 3)], PAGE_SIZE, out,
                         max_call_bytes=2 * PAGE_SIZE + 8)
    assert refused == [start + PAGE_SIZE, start + 2 * PAGE_SIZE]
    assert out[0].tobytes() == b"f" * PAGE_SIZE and not out[1:3].any() and np.all(out[3:] == 9)


@pytest.fixture
def big_child():
    """A child with 2.25 GiB of private memory, mapped to the zero page, marked around the 2 GiB mark."""
    npages = (2 * GiB + GiB // 4) // PAGE_SIZE
    marked = [0, 1, 2 * GiB // PAGE_SIZE - 2, 2 * GiB // PAGE_SIZE - 1, 2 * GiB // PAGE_SIZE,
              2 * GiB // PAGE_SIZE + 1, npages - 1]
    process = subprocess.Popen([sys.executable, "-c", BIG_CHILD, str(npages * PAGE_SIZE), *map(str, marked)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not line:
            pytest.skip("the child could not map 2.25 GiB")
        yield process.pid, int(line), npages, marked
    finally:
        process.kill()
        process.wait(timeout=10)
        process.stdin.close()
        process.stdout.close()


@pytest.mark.parametrize("limit", [None, 4 * GiB], ids=["default-calls", "kernel-cuts-at-2GiB"])
def test_a_run_longer_than_2_gib_is_read_whole(big_child, limit):
    pid, address, npages, marked = big_child
    out = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    assert read_pages(pid, [(address, npages, 0)], PAGE_SIZE, out, max_call_bytes=limit) == []
    for page in marked:
        assert np.all(out[page] == page % 251 + 1), f"page {page} of the run"
    assert np.count_nonzero(out[:, 0]) == len(marked)


@pytest.mark.parametrize("copy", COPY_MODES)
def test_a_checkpoint_read_in_small_calls_replays_to_the_process_memory(child, copy, monkeypatch):
    monkeypatch.setattr(procmem, "MAX_CALL_BYTES", 5 * PAGE_SIZE + 512)
    address = child.map(300, 4)
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0, checkpoints=2)
    with started(source) as stream:
        first = next_epoch(stream)
        assert child.command("write 1 299 8") == "ok"
        batches = first + list(stream)
    replayed, _ = replay(batches)
    base = page_number_of(first[0], address)
    assert b"".join(replayed[base + i] for i in range(300)) == live_memory(child.process.pid, address,
                                                                          300 * PAGE_SIZE)


@pytest.mark.parametrize("copy", COPY_MODES)
def test_pages_past_the_end_of_a_mapped_file_are_counted_and_sent_as_zeros(child, copy):
    address = int(child.command("past_eof"))
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0, checkpoints=2)
    with started(source) as stream:
        batches = list(stream)
    assert source.counters["past_eof_pages"] == 2
    replayed, _ = replay(batches)
    first = page_number_of(batches[0], address)
    assert replayed[first] == b"f" * PAGE_SIZE
    assert replayed[first + 1] == replayed[first + 2] == bytes(PAGE_SIZE)


@pytest.mark.parametrize("copy", COPY_MODES)
def test_any_other_page_the_kernel_refuses_fails_the_checkpoint_and_the_process_runs_on(child, copy):
    address = int(child.command("guarded"))  # a memfd mapping whose page 2 is a guard page (MADV_GUARD_INSTALL)
    if address < 0:
        pytest.skip("this kernel has no MADV_GUARD_INSTALL for file mappings")
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0, checkpoints=2, name="src")
    with started(source) as stream:
        with pytest.raises(TrackerError, match=f"src: checkpoint of epoch 1 failed: pid {child.process.pid}: "
                                               f"the page at {address + 2 * PAGE_SIZE:#x} .* cannot be read"):
            next_epoch(stream)
    assert not set(thread_states(child.process.pid)) & set("Tt")
    assert child.command("write 0 0 5") == "ok"
