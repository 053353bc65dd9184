"""The fused xor-delta + rle batch kernel: the page codecs' encodings in rle's entry order, the cache updated
in the same pass, and inconsistent plans refused without writing past the payload."""
from __future__ import annotations

import numpy as np
import pytest

from cython_kernels import page_cache, page_codecs
from pipeline.batch import KIND_DELTA, KIND_FULL, KIND_RAW, KIND_UNCHANGED, KIND_ZERO
from stages.codecs import get_codec

PAGE = 4096


def test_format_numbers_are_the_page_codecs_ones():
    assert page_cache.FORMATS == {"native": page_codecs.NATIVE, "xbzrle": page_codecs.XBZRLE,
                                  "xen": page_codecs.XEN}


def planned_batch(seed: int = 0):
    """Six pages: two hits (one changed a little, one unchanged), a miss, a RAW page, a ZERO page not cached,
    a hit overwritten with noise; and a four-slot cache holding the hits' old copies."""
    generator = np.random.default_rng(seed)
    cache = generator.integers(0, 256, (4, PAGE), dtype=np.uint8)
    pages = generator.integers(0, 256, (6, PAGE), dtype=np.uint8)
    pages[0] = cache[2]
    pages[0, 100:120] ^= 0x5A
    pages[1] = cache[0]
    pages[4] = 0
    kinds = np.array([KIND_DELTA, KIND_DELTA, KIND_FULL, KIND_RAW, KIND_ZERO, KIND_DELTA], np.uint8)
    slots = np.array([2, 0, 1, -1, -1, 3], np.int64)
    return pages, kinds, slots, cache


def run_kernel(fmt_name: str, pages, kinds, slots, cache, emit_zero=False, capacity=None):
    fmt = page_cache.FORMATS[fmt_name]
    hits = int(np.count_nonzero(kinds == KIND_DELTA))
    whole = int(np.count_nonzero((kinds == KIND_FULL) | (kinds == KIND_RAW)))
    size = page_cache.payload_capacity(fmt, hits, whole, PAGE) if capacity is None else capacity
    payload = np.empty(size, np.uint8)
    offsets, out_kinds = np.empty(len(kinds) + 1, np.uint64), np.empty(len(kinds), np.uint8)
    order = np.empty(len(kinds), np.int64)
    used = page_cache.encode_batch(fmt, pages, kinds, slots, cache, payload, offsets, out_kinds, order, emit_zero)
    return used, payload[:max(used, 0)], offsets, out_kinds, order


@pytest.mark.parametrize("fmt_name", ["native", "xbzrle", "xen"])
def test_batch_kernel_matches_the_page_codec_and_orders_encoded_whole_zero(fmt_name):
    pages, kinds, slots, cache = planned_batch()
    expected_cache = cache.copy()
    hits = np.flatnonzero(kinds == KIND_DELTA)
    encoded = get_codec(fmt_name).encode(pages[hits], expected_cache, slots=slots[hits])
    used, payload, offsets, out_kinds, order = run_kernel(fmt_name, pages, kinds, slots, cache)

    assert order.tolist() == [0, 1, 5, 2, 3, 4]              # encoded pages, then whole ones, then zero ones
    end = int(encoded.offsets[-1])
    assert out_kinds[:3].tolist() == encoded.kinds.tolist()
    assert out_kinds[1] == KIND_UNCHANGED
    assert out_kinds[3:].tolist() == [KIND_FULL, KIND_RAW, KIND_ZERO]
    assert offsets[:4].tolist() == encoded.offsets.tolist()
    assert bytes(payload[:end]) == bytes(encoded.payload[:end])
    assert bytes(payload[end:]) == pages[2].tobytes() + pages[3].tobytes()
    assert used == end + 2 * PAGE and offsets[-1] == used
    expected_cache[1] = pages[2]                              # the miss enters its slot; RAW has none
    assert np.array_equal(cache, expected_cache)


def test_zero_pages_with_a_slot_zero_their_cached_copy():
    pages, kinds, slots, cache = planned_batch()
    slots[4] = 1
    kinds[2], slots[2] = KIND_ZERO, -1
    pages[2] = 0
    run_kernel("native", pages, kinds, slots, cache)
    assert not cache[1].any()


def test_emit_zero_sends_a_hit_that_became_all_zeros_as_zero():
    cache = np.full((1, PAGE), 7, np.uint8)
    pages = np.zeros((1, PAGE), np.uint8)
    used, _, offsets, out_kinds, _ = run_kernel("native", pages, np.array([KIND_DELTA], np.uint8),
                                                np.array([0], np.int64), cache, emit_zero=True)
    assert (used, out_kinds.tolist(), offsets.tolist()) == (0, [KIND_ZERO], [0, 0])
    assert not cache.any()


@pytest.mark.parametrize("change", ["delta without slot", "slot past the cache", "unknown kind", "short payload",
                                    "kinds length"])
def test_batch_kernel_refuses_an_inconsistent_plan(change):
    pages, kinds, slots, cache = planned_batch()
    capacity = None
    if change == "delta without slot":
        slots[0] = -1
    elif change == "slot past the cache":
        slots[2] = 4
    elif change == "unknown kind":
        kinds[2] = 9
    elif change == "short payload":
        capacity = PAGE
    else:
        kinds = kinds[:5]
    guard = 0xEE
    if capacity is not None:
        memory = np.full(capacity + 256, guard, np.uint8)
        offsets, out_kinds, order = np.empty(7, np.uint64), np.empty(6, np.uint8), np.empty(6, np.int64)
        used = page_cache.encode_batch(page_cache.FORMATS["native"], pages, kinds, slots, cache, memory[:capacity],
                                       offsets, out_kinds, order, False)
        assert np.all(memory[capacity:] == guard)
    else:
        used = run_kernel("native", pages, kinds, slots, cache)[0]
    assert used == -1
