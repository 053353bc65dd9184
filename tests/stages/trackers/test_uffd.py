"""userfaultfd async write-protect + PAGEMAP_SCAN: written pages are found and re-armed."""
from __future__ import annotations

import pytest

from pipeline.errors import TrackerError
from stages.trackers.region import PAGE_SIZE, tracked_array
from stages.trackers.uffd import WriteTracker


@pytest.fixture
def tracker():
    tracker = WriteTracker()
    yield tracker
    tracker.close()


def written_pages(tracker, memory):
    return ((tracker.collect(memory.ctypes.data, memory.nbytes) - memory.ctypes.data) // PAGE_SIZE).tolist()


def test_collect_lists_exactly_the_written_pages_and_rearms_them(tracker):
    memory = tracked_array((64, PAGE_SIZE))
    memory[1] = 1  # populated before registration: not reported
    tracker.register(memory.ctypes.data, memory.nbytes)
    assert written_pages(tracker, memory) == []
    memory[5, 0] = 1
    memory[6, 4095] = 1
    memory[63, 17] = 1
    _ = memory[20].sum()  # reads are not writes
    assert written_pages(tracker, memory) == [5, 6, 63]
    assert written_pages(tracker, memory) == []
    memory[5, 1] = 2
    assert written_pages(tracker, memory) == [5]


def test_collect_takes_several_scans_when_ranges_exceed_the_vector(tracker):
    memory = tracked_array((100, PAGE_SIZE))
    tracker.register(memory.ctypes.data, memory.nbytes)
    tracker.scanner.vector_len = 3
    memory[::3, 0] = 1  # 34 separate ranges
    assert written_pages(tracker, memory) == list(range(0, 100, 3))


def test_unregistered_range_is_a_tracker_error(tracker):
    memory = tracked_array((4, PAGE_SIZE))
    with pytest.raises(TrackerError, match="PAGEMAP_SCAN"):
        tracker.collect(memory.ctypes.data, memory.nbytes)


def test_unaligned_range_is_a_tracker_error(tracker):
    memory = tracked_array((4, PAGE_SIZE))
    with pytest.raises(TrackerError, match="not page aligned"):
        tracker.register(memory.ctypes.data + 8, PAGE_SIZE)
