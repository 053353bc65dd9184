"""Every codec rebuilds the current pages, brings the cache up to date, and reports sensible kinds."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from page_pairs import PATTERNS
from pipeline.batch import PageKind
from stages.codecs import Encoded, get_codec, list_codecs

PAGE_CODEC_CHAINS = [name for name in list_codecs() if name.split("+")[0] in ("native", "xbzrle", "xen")]
ALL_PAGE_SIZES = [1 << bits for bits in range(9, 17)]


def page_sizes_of(name: str) -> list[int]:
    return ALL_PAGE_SIZES if name.startswith("native") else [4096]


def round_trip(codec, cached: np.ndarray, current: np.ndarray):
    cache = cached.copy()
    replica = cached.copy()
    encoded = codec.encode(current, cache)
    codec.decode(encoded, replica)
    return encoded, cache, replica


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(PAGE_CODEC_CHAINS), pattern=st.sampled_from(PATTERNS),
       size_index=st.integers(0, len(ALL_PAGE_SIZES) - 1), npages=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_decode_rebuilds_current_pages_and_encode_updates_cache(make_pair, name, pattern, size_index, npages, seed):
    sizes = page_sizes_of(name)
    cached, current = make_pair(pattern, sizes[size_index % len(sizes)], npages, seed)
    encoded, cache, replica = round_trip(get_codec(name), cached, current)
    assert np.array_equal(cache, current)
    assert np.array_equal(replica, current)
    assert encoded.codec == name
    assert encoded.offsets.shape == (npages + 1,) and encoded.kinds.shape == (npages,)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), npages=st.integers(1, 3))
def test_arbitrary_byte_edits_round_trip(data, npages):
    """Hypothesis picks the edited positions and values directly (not from a pattern)."""
    name = data.draw(st.sampled_from(PAGE_CODEC_CHAINS))
    page_size = data.draw(st.sampled_from(page_sizes_of(name)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    cached = rng.integers(0, 256, size=(npages, page_size), dtype=np.uint8)
    current = cached.copy()
    flat = current.reshape(-1)
    edits = data.draw(st.lists(st.tuples(st.integers(0, flat.size - 1), st.integers(0, 255)), max_size=200))
    for position, value in edits:
        flat[position] = value
    _, cache, replica = round_trip(get_codec(name), cached, current)
    assert np.array_equal(cache, current)
    assert np.array_equal(replica, current)


@pytest.mark.parametrize("name", PAGE_CODEC_CHAINS)
def test_kinds_follow_the_page_changes(name, mixed_batch):
    cached, current = mixed_batch
    encoded, _, _ = round_trip(get_codec(name), cached, current)
    kinds = [PageKind(k) for k in encoded.kinds]
    assert kinds[PATTERNS.index("unchanged")] == PageKind.UNCHANGED
    assert kinds[PATTERNS.index("zero_pages")] == PageKind.UNCHANGED
    assert kinds[PATTERNS.index("one_byte")] == PageKind.DELTA
    expected_dense = PageKind.DELTA if name.startswith("xen") else PageKind.FULL
    assert kinds[PATTERNS.index("all_changed")] == expected_dense
    expected_zero = PageKind.ZERO if name.startswith("native") else expected_dense
    assert kinds[PATTERNS.index("became_zero")] == expected_zero


@pytest.mark.parametrize("name", ["native", "xbzrle", "xen"])
def test_slices_have_the_documented_sizes(name, mixed_batch):
    cached, current = mixed_batch
    codec = get_codec(name)
    encoded, _, _ = round_trip(codec, cached, current)
    lengths = np.diff(encoded.offsets.astype(np.int64))
    page_size = current.shape[1]
    for kind, length in zip(encoded.kinds, lengths):
        if kind == PageKind.FULL:
            assert length == page_size
        elif kind == PageKind.UNCHANGED:
            assert length == len(codec.unchanged_bytes())
        elif kind == PageKind.ZERO:
            assert length == 0
        else:
            assert 0 < length <= codec.max_page_bytes(page_size)
            assert name != "native" or length < page_size


def test_native_never_sends_a_delta_as_large_as_the_page(make_pair):
    for pattern in PATTERNS:
        cached, current = make_pair(pattern, 512, 4, 7)
        encoded = get_codec("native").encode(current, cached.copy())
        lengths = np.diff(encoded.offsets.astype(np.int64))
        assert np.all(lengths[encoded.kinds == PageKind.DELTA] < 512)


def test_native_is_never_larger_than_xbzrle(mixed_batch):
    cached, current = mixed_batch
    native = get_codec("native").encode(current, cached.copy())
    xbzrle = get_codec("xbzrle").encode(current, cached.copy())
    assert np.all(np.diff(native.offsets.astype(np.int64)) <= np.diff(xbzrle.offsets.astype(np.int64)))


def test_native_without_emit_zero_sends_zeroed_pages_as_runs(make_pair):
    cached, current = make_pair("became_zero", 4096, 2, 3)
    codec = get_codec("native", emit_zero=False)
    encoded, cache, replica = round_trip(codec, cached, current)
    assert PageKind.ZERO not in encoded.kinds
    assert np.array_equal(replica, current) and np.array_equal(cache, current)


@pytest.mark.parametrize("name", ["native", "xbzrle+zstd", "xen+lz4"])
def test_slots_and_rows_pick_cache_and_replica_rows(name, make_pair):
    cached, current = make_pair("sparse_words", 4096, 3, 11)
    codec = get_codec(name)
    cache = np.zeros((10, 4096), dtype=np.uint8)
    slots = np.array([7, 2, 5])
    cache[slots] = cached
    untouched = cache[[0, 1, 3, 4, 6, 8, 9]].copy()
    encoded = codec.encode(current, cache, slots=slots)
    assert np.array_equal(cache[slots], current)
    assert np.array_equal(cache[[0, 1, 3, 4, 6, 8, 9]], untouched)
    replica = np.zeros((6, 4096), dtype=np.uint8)
    rows = np.array([4, 0, 2], dtype=np.uint64)
    replica[rows.astype(np.intp)] = cached
    codec.decode(encoded, replica, rows=rows)
    assert np.array_equal(replica[rows.astype(np.intp)], current)
    assert not replica[[1, 3, 5]].any()


@pytest.mark.parametrize("name", PAGE_CODEC_CHAINS)
def test_empty_batch_round_trips(name):
    empty = np.empty((0, 4096), dtype=np.uint8)
    codec = get_codec(name)
    encoded = codec.encode(empty, empty.copy())
    assert encoded.kinds.shape == (0,) and list(encoded.offsets) == [0]
    codec.decode(encoded, np.empty((0, 4096), dtype=np.uint8))


@pytest.mark.parametrize("name", ["native", "xbzrle", "xen"])
def test_stages_may_add_full_and_zero_pages_without_the_codec(name):
    """FULL is the raw page and ZERO is empty in every format, so callers can build them."""
    page = np.arange(4096, dtype=np.uint32).astype(np.uint8)
    encoded = Encoded(payload=page.copy(), offsets=np.array([0, 4096, 4096], dtype=np.uint64),
                      kinds=np.array([PageKind.FULL, PageKind.ZERO], dtype=np.uint8), codec=name, raw_size=4096)
    replica = np.full((2, 4096), 9, dtype=np.uint8)
    get_codec(name).decode(encoded, replica)
    assert np.array_equal(replica[0], page) and not replica[1].any()
