"""Built-in workloads: their dirtying patterns, and workload-src streaming them through region-src."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.batch import Flag
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.trackers.region import PAGE_SIZE, tracked_array
from stages.trackers.workload import WorkloadSource, make_workload
from tracker_streams import replay

PAGES = 256


def pages_changed_by(kind: str, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Page indices a workload changes in ``steps`` steps (after its setup), and the memory."""
    memory = tracked_array(PAGES * PAGE_SIZE)
    workload = make_workload(kind, memory, seed)
    before = memory.reshape(PAGES, PAGE_SIZE).copy()
    for _ in range(steps):
        workload.step()
    changed = np.flatnonzero(np.any(memory.reshape(PAGES, PAGE_SIZE) != before, axis=1))
    return changed, memory


def test_kv_updates_few_pages_and_hot_keys_repeat():
    changed, _ = pages_changed_by("kv", 1)
    assert 0 < len(changed) < PAGES // 2
    memory = tracked_array(PAGES * PAGE_SIZE)
    workload = make_workload("kv", memory, seed=3)
    for _ in range(10):
        workload.step()
    counts = np.sort(workload.counters)[::-1]
    assert counts[0] >= 50 and counts[0] > 10 * counts[20], "Zipf popularity: the hottest key dominates"


def test_sim_rewrites_most_pages_within_a_checkpoints_worth_of_steps():
    changed, _ = pages_changed_by("sim", 8)
    assert len(changed) >= 0.9 * PAGES


def test_log_dirties_a_contiguous_run_at_the_tail_plus_the_header():
    changed, memory = pages_changed_by("log", 3)
    assert changed[0] == 0
    body = changed[1:]
    assert len(body) >= 3 and np.all(np.diff(body) == 1) and body[0] == 1
    tail, records = memory[:16].view(np.uint64)
    assert records == 3 * 64 and PAGE_SIZE * (body[-1] - 1) < tail <= PAGE_SIZE * body[-1]


def test_workloads_are_reproducible_from_their_seed():
    for kind in ("kv", "sim", "log"):
        assert np.array_equal(pages_changed_by(kind, 2, seed=5)[1], pages_changed_by(kind, 2, seed=5)[1])


def test_unknown_workload_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown workload 'btree'"):
        make_workload("btree", tracked_array(PAGE_SIZE * 4))


@pytest.mark.parametrize("kind", ["kv", "sim", "log"])
def test_workload_source_stream_replays_to_the_workload_memory(kind):
    source = WorkloadSource(kind=kind, size="1MiB", seconds=0.1, rate=100, seed=1, batch_pages=64)
    source.start(StageContext("workload-src"))
    try:
        batches = list(source.produce())
    finally:
        source.stop()
    pages, ends = replay(batches, batch_pages=64)
    assert len(ends) >= 2
    assert batches[0].meta["tracking"] == "uffd"
    memory = source.workload.memory.reshape(-1, PAGE_SIZE)
    assert pages == {index: row.tobytes() for index, row in enumerate(memory)}
    if kind == "sim":
        assert np.mean([end.meta["pages"] for end in ends[1:]]) > 0.5 * len(memory)


def test_workload_source_resync_resends_every_page():
    source = WorkloadSource(kind="log", size="256KiB", seconds=0.2, rate=50)
    source.start(StageContext("workload-src"))
    try:
        stream = source.produce()
        first = [next(stream) for _ in range(3)]  # layout, the 64 pages, epoch end
        source.request_resync()
        batches = first + list(stream)
    finally:
        source.stop()
    resynced = [b for b in batches if b.flags & Flag.EPOCH_END and b.flags & Flag.RESYNC]
    assert first[-1].meta["pages"] == 64 and resynced and resynced[0].meta["pages"] == 64
    replay(batches)


def test_workload_source_stops_its_driver_when_the_consumer_stops_early():
    source = WorkloadSource(kind="kv", size="1MiB", seconds=60, rate=200, staging="64KiB", batch_pages=4)
    source.start(StageContext("workload-src"))
    stream = source.produce()
    assert next(stream).flags  # the layout
    next(stream)
    stream.close()  # the driver is blocked on a full staging buffer by now, or soon
    assert not any(t.name == "workload-src driver" and t.is_alive() for t in threading.enumerate())
