"""process-src: checkpoints of a real child process, following its mappings."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pipeline.batch import Flag
from pipeline.errors import TrackerError, TransportError
from pipeline.stage import StageContext
from stages.common.acks import AckSender
from stages.trackers.procmem import thread_states
from stages.trackers.process import PAGE_SIZE, ProcessSource
from tracker_streams import replay

CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    maps = []
    def new_map(pages, value):
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        m[:] = bytes([value]) * len(m)
        maps.append(m)
        print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
    new_map(16, 1)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "write":
            index, page, value = map(int, args)
            maps[index][page * mmap.PAGESIZE:(page + 1) * mmap.PAGESIZE] = bytes([value]) * mmap.PAGESIZE
            print("ok", flush=True)
        elif command == "map":
            new_map(int(args[0]), int(args[1]))
        elif command == "reserve":  # private anonymous memory, never touched
            maps.append(mmap.mmap(-1, int(args[0]) * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            print(ctypes.addressof(ctypes.c_char.from_buffer(maps[-1])), flush=True)
        elif command == "past_eof":  # a private file mapping of 3 pages over a 1-page file
            import os, tempfile
            fd, path = tempfile.mkstemp()
            os.write(fd, b"f" * mmap.PAGESIZE)
            address = libc.mmap(None, 3 * mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
            os.unlink(path)
            print(address, flush=True)
        elif command == "guarded":  # a private memfd mapping of 4 pages, page 2 a guard page (-1: unsupported)
            import os
            fd = os.memfd_create("guarded")
            os.ftruncate(fd, 4 * mmap.PAGESIZE)
            address = libc.mmap(None, 4 * mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
            ctypes.memset(address, 7, 4 * mmap.PAGESIZE)
            failed = libc.madvise(ctypes.c_void_p(address + 2 * mmap.PAGESIZE), mmap.PAGESIZE, 102)
            print(-1 if failed else address, flush=True)
        elif command == "spin":  # a second thread rewriting page 0 of the first mapping without pause
            import threading
            def spin():
                value = 0
                while True:
                    value = (value + 1) % 256
                    maps[0][0] = value
            threading.Thread(target=spin, daemon=True).start()
            print("ok", flush=True)
        elif command == "churn_threads":  # threads starting and ending without pause
            import threading
            def churn():
                while True:
                    workers = [threading.Thread(target=sum, args=(range(100),)) for _ in range(4)]
                    for worker in workers:
                        worker.start()
                    for worker in workers:
                        worker.join()
            threading.Thread(target=churn, daemon=True).start()
            print("ok", flush=True)
        elif command == "unmap":
            maps.pop().close()
            print("ok", flush=True)
        elif command == "exit":
            sys.exit(0)
""")


COPY_MODES = ["all", "changed"]


class Child:
    """A Python child holding anonymous mappings it writes on command."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.addresses = [int(self.process.stdout.readline())]

    def command(self, text: str) -> str:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def map(self, pages: int, value: int) -> int:
        self.addresses.append(int(self.command(f"map {pages} {value}")))
        return self.addresses[-1]

    def stop(self):
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture
def child():
    child = Child()
    yield child
    child.stop()


@contextlib.contextmanager
def started(source: ProcessSource):
    source.start(StageContext("process-src"))
    try:
        yield source.produce()
    finally:
        source.stop()


def next_epoch(stream) -> list:
    """Batches up to and including the next epoch end (or end of stream)."""
    batches = []
    for batch in stream:
        batches.append(batch)
        if batch.flags & (Flag.EPOCH_END | Flag.END_OF_STREAM):
            return batches
    return batches


def page_number_of(layout_batch, address: int) -> int:
    for region in layout_batch.meta["regions"]:
        if region["start"] <= address < region["start"] + region["npages"] * PAGE_SIZE:
            return region["first_page"] + (address - region["start"]) // PAGE_SIZE
    raise AssertionError(f"{address:#x} not in the layout")


@pytest.mark.parametrize("copy", COPY_MODES)
def test_written_pages_of_a_live_process_appear_in_the_next_epoch(child, copy):
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0, checkpoints=3)
    with started(source) as stream:
        first = next_epoch(stream)
        layout = first[0]
        assert layout.flags & Flag.LAYOUT and layout.meta["pid"] == child.process.pid
        assert first[-1].meta["pages"] == sum(r["npages"] for r in layout.meta["regions"])
        assert child.command("write 0 3 9") == "ok"
        second = next_epoch(stream)
        assert "T" not in thread_states(child.process.pid), "resumed after every checkpoint"
        target = page_number_of(layout, child.addresses[0] + 3 * PAGE_SIZE)
        pages = {int(p): row for b in second if b.npages for p, row in zip(b.page_numbers, b.data)}
        assert target in pages and np.all(pages[target] == 9)
        assert page_number_of(layout, child.addresses[0]) not in pages
        batches = first + second + list(stream)
    replayed, ends = replay(batches)
    assert len(ends) == 3
    with open(f"/proc/{child.process.pid}/mem", "rb") as mem:
        mem.seek(child.addresses[0])
        live = mem.read(16 * PAGE_SIZE)
    base = page_number_of(layout, child.addresses[0])
    assert b"".join(replayed[base + i] for i in range(16)) == live


def test_every_thread_is_stopped_for_the_checkpoint_and_resumed_after(child):
    assert child.command("spin") == "ok"
    source = ProcessSource(pid=child.process.pid, interval=0.01, checkpoints=4)
    with started(source) as stream:
        layout = next(stream)
        target = page_number_of(layout, child.addresses[0])
        epochs = [next_epoch(stream) for _ in range(3)]
        assert len(thread_states(child.process.pid)) == 2
        assert "T" not in thread_states(child.process.pid)
        list(stream)
    spun = [any(target in b.page_numbers for b in epoch if b.npages) for epoch in epochs[1:]]
    assert all(spun), "the spinning thread ran between checkpoints"


@pytest.mark.parametrize("copy", COPY_MODES)
def test_mappings_that_appear_and_vanish_change_the_layout(child, copy):
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0)
    with started(source) as stream:
        epoch1 = next_epoch(stream)
        address = child.map(1100, 5)  # more than one read chunk
        epoch2 = next_epoch(stream)
        layout = epoch2[0]
        assert layout.flags & Flag.LAYOUT and layout.epoch == 2
        first = page_number_of(layout, address)
        pages = {int(p): row for b in epoch2 if b.npages for p, row in zip(b.page_numbers, b.data)}
        assert all(np.all(pages[first + i] == 5) for i in range(1100))
        assert child.command("write 1 1050 6") == "ok"
        epoch3 = next_epoch(stream)
        written = [int(p) for b in epoch3 if b.npages for p in b.page_numbers if first <= p < first + 1100]
        assert written == [first + 1050]
        assert child.command("unmap") == "ok"
        epoch4 = next_epoch(stream)
        source.close()
        rest = list(stream)
    assert epoch4[0].flags & Flag.LAYOUT
    vanished = epoch4[0].meta["vanished"]
    assert any(v["first_page"] <= first and first + 1100 <= v["first_page"] + v["npages"] for v in vanished)
    assert page_number_of(layout, child.addresses[0]) == page_number_of(epoch1[0], child.addresses[0])
    replayed, _ = replay(epoch1 + epoch2 + epoch3 + epoch4 + rest)
    assert not any(first + i in replayed for i in range(1100)), "vanished pages are dropped"


@pytest.mark.parametrize("copy", COPY_MODES)
def test_never_written_memory_is_not_read_yet_replays_as_zeros(child, copy):
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0, checkpoints=3)
    with started(source) as stream:
        first = next_epoch(stream)
        address = int(child.command("reserve 3000"))
        second = next_epoch(stream)
        untouched_read = source.counters["read_pages"]
        assert child.command("write 1 2500 7") == "ok"
        third = next_epoch(stream)
        rest = list(stream)
    base = page_number_of(second[0], address)
    assert source.counters["tracked_pages"] - untouched_read >= 3000, "the reserved pages were skipped"
    assert [int(p) for b in third if b.npages for p in b.page_numbers if base <= p < base + 3000] == [base + 2500]
    replayed, _ = replay(first + second + third + rest)
    with open(f"/proc/{child.process.pid}/mem", "rb") as mem:
        mem.seek(address)
        live = mem.read(3000 * PAGE_SIZE)
    assert b"".join(replayed[base + i] for i in range(3000)) == live
    assert live[2500 * PAGE_SIZE] == 7


@pytest.mark.parametrize("copy", COPY_MODES)
def test_resync_carries_every_page_flagged_resync(child, copy):
    source = ProcessSource(copy=copy, pid=child.process.pid, interval=0, checkpoints=3)
    with started(source) as stream:
        first = next_epoch(stream)
        source.request_resync()
        second = next_epoch(stream)
        third = next_epoch(stream)
    everything = first[-1].meta["pages"]
    assert second[-1].meta["pages"] == everything and second[-1].flags & Flag.RESYNC
    assert second[0].flags == Flag.LAYOUT, "a receiver starting over gets the layout again"
    assert all(b.flags & Flag.RESYNC for b in second[1:])
    assert third[-1].meta["pages"] < everything and not third[-1].flags & Flag.RESYNC


def test_resync_requests_and_acks_from_the_receivers_ack_channel_reach_the_tracker(child, tmp_path):
    endpoint = f"ipc://{tmp_path}/acks"
    source = ProcessSource(pid=child.process.pid, interval=0, checkpoints=4, ack_endpoint=endpoint)
    receiver = AckSender(endpoint)                      # what replica-sink ack-endpoint= runs
    try:
        with started(source) as stream:
            first = next_epoch(stream)
            assert receiver.ack(1, stream_id=source.stream_id) and receiver.request_resync("receiver started, replica at epoch 1")
            assert first[0].meta["stream_id"] == source.stream_id   # what frame writes into the wire
            deadline = time.monotonic() + 10
            while not source._resync_requested and time.monotonic() < deadline:
                time.sleep(0.01)
            second = next_epoch(stream)
            next_epoch(stream)
            assert source.counters["acknowledged_epoch"] == 1
    finally:
        receiver.close()
    assert second[-1].flags & Flag.RESYNC and second[-1].meta["pages"] == first[-1].meta["pages"]


def test_an_ack_endpoint_that_cannot_be_bound_is_a_clear_error(child):
    source = ProcessSource(pid=child.process.pid, ack_endpoint="tcp://256.0.0.1:1", insecure=True)
    with pytest.raises(TransportError, match="process-src: ack channel: cannot bind 'tcp://256.0.0.1:1'"):
        source.start(StageContext("process-src"))


def test_a_process_that_exits_ends_the_stream_cleanly(child):
    source = ProcessSource(pid=child.process.pid, interval=0)
    with started(source) as stream:
        next_epoch(stream)
        child.process.stdin.write("exit\n")
        child.process.stdin.flush()
        child.process.wait(timeout=10)
        rest = list(stream)
    assert rest[-1].flags == Flag.END_OF_STREAM and rest[-1].epoch == 1


def test_stop_at_end_leaves_the_process_stopped_after_the_final_checkpoint(child):
    source = ProcessSource(pid=child.process.pid, interval=0, checkpoints=2, stop_at_end=True)
    with started(source) as stream:
        batches = list(stream)
    assert [b.epoch for b in batches if b.flags & Flag.EPOCH_END] == [1, 2]
    assert set(thread_states(child.process.pid)) == {"T"}


def test_a_process_killed_mid_checkpoint_is_a_tracker_error_and_earlier_epochs_stand(child):
    class KilledWhileStopped(ProcessSource):
        def _paused(self, members, everything):
            if self.counters.get("checkpoints") == 1:
                os.kill(self.pid, signal.SIGKILL)
                child.process.wait(timeout=10)
            return super()._paused(members, everything)

    source = KilledWhileStopped(pid=child.process.pid, interval=0, name="victim")
    with started(source) as stream:
        first = next_epoch(stream)
        with pytest.raises(TrackerError, match="victim: checkpoint of epoch 2 failed: pid .* died"):
            next(stream)
    assert first[-1].flags & Flag.EPOCH_END and first[-1].epoch == 1


def test_a_pid_that_does_not_exist_is_a_clear_error():
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    with pytest.raises(TrackerError, match=f"process-src: no process with pid {gone.pid}"):
        ProcessSource(pid=gone.pid).start(StageContext("process-src"))


def test_a_process_without_readable_memory_is_a_clear_error():
    with open("/proc/2/comm") as comm:
        if comm.read().strip() != "kthreadd":
            pytest.skip("pid 2 is not kthreadd here")
    with pytest.raises(TrackerError, match="pid 2: no writable memory"):
        ProcessSource(pid=2).start(StageContext("process-src"))
