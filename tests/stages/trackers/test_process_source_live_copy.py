"""process-src mode=uffd copies a checkpoint that sends everything (the first, a resync) while the process
runs: the pause reads only the pages written during that copy, and the replica still equals the stopped
process exactly, whatever it wrote meanwhile."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipeline.batch import Flag
from pipeline.stage import StageContext
from stages.trackers.process import ProcessSource
from stages.trackers.procmem import thread_states
from test_process_source_uffd import Changing, assert_replica_equals_memory, read_memory, replicate

PAGE = os.sysconf("SC_PAGE_SIZE")
MEMORY_PAGES = 16384  # 64 MiB written by the child

# Fills MEMORY_PAGES pages, then rewrites argv[1] random pages every 10 ms ("hammer": every page, in address
# order and as fast as it can, so the live copy keeps meeting pages being written).
WRITER = textwrap.dedent("""
    import random, sys, time
    pages = int(sys.argv[2])
    memory = bytearray(b"\\x01") * (pages * 4096)
    rng = random.Random(0)
    print("ready", flush=True)
    if sys.argv[1] == "hammer":
        value = 0
        while True:
            value = (value + 1) & 0xFF
            for offset in range(8, len(memory), 4096):
                memory[offset] = value
    while True:
        for _ in range(int(sys.argv[1])):
            offset = rng.randrange(pages) * 4096 + rng.randrange(4096)
            memory[offset] = (memory[offset] + 1) & 0xFF
        time.sleep(0.01)
""")


@pytest.fixture
def writer(request):
    process = subprocess.Popen([sys.executable, "-c", WRITER, request.param, str(MEMORY_PAGES)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.mark.parametrize("writer", ["16"], indirect=True)
def test_the_first_pause_reads_the_pages_written_during_the_live_copy_not_the_whole_memory(writer, tmp_path):
    result, replica = replicate(writer.pid, tmp_path, "mode=uffd stop-at-end=true", checkpoints=1)
    assert set(thread_states(writer.pid)) == {"T"}
    assert assert_replica_equals_memory(replica, writer.pid) >= MEMORY_PAGES
    counters = result.statistics[("src", 0)]["counters"]
    sent = counters["checkpoint_pages"]
    assert sent >= MEMORY_PAGES
    assert counters["live_copied_pages"] >= MEMORY_PAGES, "every written page copied while the process ran"
    assert counters["pause_read_pages"] * 10 < sent, (
        f"the first pause read {counters['pause_read_pages']} of the {sent} pages it sent")
    assert counters["arming_pause_ms"] > 0


@pytest.mark.parametrize("writer", ["hammer"], indirect=True)
def test_pages_written_while_they_are_copied_live_are_read_again_in_the_pause(writer, tmp_path):
    result, replica = replicate(writer.pid, tmp_path, "mode=uffd stop-at-end=true", checkpoints=1)
    assert set(thread_states(writer.pid)) == {"T"}
    assert assert_replica_equals_memory(replica, writer.pid) >= MEMORY_PAGES
    assert result.statistics[("src", 0)]["counters"]["pause_read_pages"] > 0, "the copy raced the writer"


def test_a_process_that_maps_unmaps_and_drops_pages_during_the_live_copy(tmp_path):
    child = Changing()
    try:
        replicate(child.pid, tmp_path, "mode=uffd stop-at-end=true", checkpoints=1)
        try:
            assert_replica_equals_memory(tmp_path / "replica", child.pid)
        finally:
            os.kill(child.pid, signal.SIGCONT)
    finally:
        child.close()


def _apply(memory: dict[int, bytes], regions: list[dict], batch) -> list[dict]:
    """A receiver's view, from a LAYOUT on: the regions and the latest contents of each page."""
    if batch.flags & Flag.LAYOUT:
        return batch.meta["regions"]
    for number, row in zip(batch.page_numbers.tolist(), batch.data):
        memory[number] = row.tobytes()
    return regions


@pytest.mark.parametrize("writer", ["16", "hammer"], indirect=True)
def test_a_resync_is_copied_live_and_alone_rebuilds_the_process(writer):
    """A receiver that starts over at the resync epoch, the final one here (dropping all it had), ends equal to the
    stopped process; with a few pages written meanwhile, the resync's pause reads few pages."""
    source = ProcessSource(pid=writer.pid, interval=0.01, checkpoints=3, mode="uffd", stop_at_end=True)
    source.start(StageContext("process-src"))
    memory: dict[int, bytes] = {}
    regions: list[dict] = []
    resync_counters: dict = {}
    try:
        for batch in source.produce():
            if batch.flags & Flag.EPOCH_END and batch.epoch == 2:
                source.request_resync()
            if batch.epoch == 3 and batch.flags & Flag.EPOCH_END:
                assert batch.flags & Flag.RESYNC
                resync_counters = dict(source.counters)
            if batch.epoch >= 3 and not batch.flags & (Flag.EPOCH_END | Flag.END_OF_STREAM):
                regions = _apply(memory, regions, batch)
    finally:
        source.stop()
    assert set(thread_states(writer.pid)) == {"T"}
    compared = 0
    for region in regions:
        live = np.frombuffer(read_memory(writer.pid, region["start"], region["npages"] * PAGE), np.uint8)
        for row in range(region["npages"]):
            page = memory.get(region["first_page"] + row)
            assert page is not None, f"page {region['first_page'] + row} of {region['name']} never sent"
            assert page == live[row * PAGE:(row + 1) * PAGE].tobytes(), f"{region['name']} page {row} differs"
            compared += 1
    assert compared >= MEMORY_PAGES
    sent = resync_counters["checkpoint_pages"]
    assert sent >= MEMORY_PAGES and resync_counters["live_copied_pages"] >= MEMORY_PAGES
    if writer.args[3] != "hammer":
        assert resync_counters["pause_read_pages"] * 10 < sent
