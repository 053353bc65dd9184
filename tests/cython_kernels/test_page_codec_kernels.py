"""The batch codec kernels guard their own buffers: they report, never overrun, when callers get sizes wrong."""
from __future__ import annotations

import numpy as np
import pytest

from cython_kernels import page_codecs

FORMATS = [page_codecs.NATIVE, page_codecs.XBZRLE, page_codecs.XEN]


def buffers(fmt: int, npages: int):
    size = page_codecs.payload_capacity(fmt, npages, 4096)
    return np.empty(size, np.uint8), np.empty(npages + 1, np.uint64), np.empty(npages, np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("short_by", [1, 4096])
def test_encode_stops_before_a_payload_buffer_could_overflow(fmt, short_by):
    current = np.ones((2, 4096), np.uint8)
    cached = np.zeros((2, 4096), np.uint8)
    capacity = page_codecs.payload_capacity(fmt, 2, 4096) - page_codecs.max_page_bytes(fmt, 4096) - short_by
    memory = np.full(capacity + 256, 0xEE, np.uint8)
    _, offsets, kinds = buffers(fmt, 2)
    assert page_codecs.encode_pages(fmt, current, cached, np.arange(2), memory[:capacity], offsets, kinds,
                                    False) == -1
    assert np.all(memory[capacity:] == 0xEE)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("slot", [-1, 2])
def test_encode_refuses_slots_outside_the_cache(fmt, slot):
    current = np.ones((1, 4096), np.uint8)
    cached = np.zeros((2, 4096), np.uint8)
    payload, offsets, kinds = buffers(fmt, 1)
    assert page_codecs.encode_pages(fmt, current, cached, np.array([slot]), payload, offsets, kinds, False) == -1
    assert not cached.any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_capacity_covers_every_page_sent_whole_or_in_runs(fmt):
    assert page_codecs.payload_capacity(fmt, 3, 4096) >= 3 * page_codecs.max_page_bytes(fmt, 4096)
    assert page_codecs.max_page_bytes(fmt, 4096) == (4096 + 16 if fmt == page_codecs.XEN else 4096)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("row", [-1, 1, 2**40])
def test_walk_reports_rows_outside_the_replica(fmt, row):
    replica = np.zeros((1, 4096), np.uint8)
    where = np.zeros(2, np.int64)
    bad = page_codecs.walk_payload(fmt, np.zeros(0, np.uint8), np.zeros(2, np.uint64),
                                   np.array([page_codecs.KINDS["ZERO"]], np.uint8), replica, np.array([row]),
                                   True, where)
    assert bad == 0 and page_codecs.REASONS[where[1]] == "row outside the replica"


def test_every_reason_code_has_a_description():
    assert len(page_codecs.REASONS) == 10 and page_codecs.REASONS[0] == "valid"
