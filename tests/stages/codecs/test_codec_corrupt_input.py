"""Decoders reject malformed payloads with CorruptData naming page and offset, and then write nothing."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.batch import PageKind
from pipeline.errors import CorruptData
from stages.codecs import Encoded, get_codec

RUN_FORMATS = ["native", "xbzrle", "xen"]
CHAINS = ["native+zstd", "xbzrle+lz4", "xen+zstd"]


def encoded_batch(name: str, mixed_batch) -> tuple[Encoded, np.ndarray]:
    cached, current = mixed_batch
    return get_codec(name).encode(current, cached.copy()), cached


def one_page(name: str, payload: bytes, kind: PageKind = PageKind.DELTA) -> Encoded:
    return Encoded(payload=np.frombuffer(payload, dtype=np.uint8),
                   offsets=np.array([0, len(payload)], dtype=np.uint64),
                   kinds=np.array([kind], dtype=np.uint8), codec=name, raw_size=len(payload))


def assert_rejected(name: str, encoded: Encoded, replica: np.ndarray, match: str | None = None, rows=None) -> CorruptData:
    before = replica.copy()
    with pytest.raises(CorruptData, match=match) as caught:
        get_codec(name).decode(encoded, replica, rows=rows)
    assert np.array_equal(replica, before), "a rejected payload must not change the replica"
    return caught.value


def decode_or_reject_cleanly(name: str, encoded: Encoded, replica: np.ndarray) -> None:
    """Decode ``encoded`` onto ``replica``; a payload rejected as CorruptData must leave it unchanged."""
    before = replica.copy()
    try:
        get_codec(name).decode(encoded, replica)
    except CorruptData:
        assert np.array_equal(replica, before), "a rejected payload must not change the replica"


def with_(encoded: Encoded, **changes) -> Encoded:
    fields = dict(payload=encoded.payload, offsets=encoded.offsets, kinds=encoded.kinds, codec=encoded.codec,
                  raw_size=encoded.raw_size)
    fields.update(changes)
    return Encoded(**fields)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(RUN_FORMATS), data=st.data())
def test_byte_flips_decode_or_raise_corrupt_data(mixed_batch, name, data):
    encoded, cached = encoded_batch(name, mixed_batch)
    payload = encoded.payload.copy()
    for _ in range(data.draw(st.integers(1, 8))):
        payload[data.draw(st.integers(0, payload.shape[0] - 1))] ^= data.draw(st.integers(1, 255))
    decode_or_reject_cleanly(name, with_(encoded, payload=payload), cached.copy())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(RUN_FORMATS), data=st.data())
def test_truncated_payloads_are_rejected(mixed_batch, name, data):
    encoded, cached = encoded_batch(name, mixed_batch)
    cut = data.draw(st.integers(0, encoded.payload.shape[0] - 1))
    assert_rejected(name, with_(encoded, payload=encoded.payload[:cut]), cached.copy(), "byte offset")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(RUN_FORMATS), data=st.data())
def test_shortened_page_slices_are_rejected_or_decode_in_bounds(mixed_batch, name, data):
    """Moving one inner offset shortens a slice: the decoder must stay inside it."""
    encoded, cached = encoded_batch(name, mixed_batch)
    offsets = encoded.offsets.copy()
    page = data.draw(st.integers(1, offsets.shape[0] - 2))
    offsets[page] = data.draw(st.integers(int(offsets[page - 1]), int(offsets[page + 1])))
    replica = cached.copy()
    try:
        get_codec(name).decode(with_(encoded, offsets=offsets), replica)
    except CorruptData as error:
        assert "page" in str(error)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(CHAINS), data=st.data())
def test_corrupt_compressed_payloads_raise_corrupt_data(mixed_batch, name, data):
    encoded, cached = encoded_batch(name, mixed_batch)
    payload = encoded.payload.copy()
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(0, payload.shape[0] - 1))]
    else:
        payload[data.draw(st.integers(0, payload.shape[0] - 1))] ^= data.draw(st.integers(1, 255))
    decode_or_reject_cleanly(name, with_(encoded, payload=payload), cached.copy())


@pytest.mark.parametrize("name, payload, match", [
    ("native", bytes([0x80, 0x40, 0x00, 0x01]), "past the end of the page"),       # skip 8192
    ("native", bytes([0x01, 0xFF, 0x1F]) + bytes(100), "past the end of the page"),  # 4096 bytes after a skip of 1
    ("native", bytes([0x00, 0x10, 1, 2, 3]), "truncated"),                           # 17 bytes promised, 3 given
    ("native", bytes([0x80, 0x80, 0x80, 0x01, 0x00]), "invalid run header"),         # 4-byte varint
    ("native", bytes([0x05]), "truncated"),
    ("xbzrle", bytes([0xFF, 0x7F, 0x01, 0x01]), "past the end of the page"),        # unchanged run of 16383
    ("xbzrle", bytes([0x00, 0x05, 1, 2]), "truncated"),
    ("xbzrle", bytes([0x80, 0x80, 0x01, 0x01, 0x01]), "invalid run header"),        # 3-byte length
    ("xbzrle", bytes([0x00, 0x00, 0x01]), "invalid run header"),                    # empty changed run
    ("xbzrle", bytes([0x00, 0x01, 0x07, 0x00, 0x01, 0x07]), "invalid run header"),  # empty later unchanged run
    ("xbzrle", bytes([0x01]), "truncated"),
    ("xbzrle", bytes(4097), "left over"),                                            # longer than a page
    ("xen", bytes([0x00]), "invalid run header"),                                   # zero-length run
    ("xen", bytes([0x80 | 127] * 9), "past the end of the page"),
    ("xen", bytes([0x80 | 127] * 8), "truncated"),                                  # covers 4064 of 4096 bytes
    ("xen", bytes([0x05, 1, 2, 3]), "truncated"),
    ("xen", bytes([0x80 | 127] * 8 + [0x88, 0x00]), "left over"),
])
def test_malformed_delta_slices(name, payload, match):
    replica = np.full((1, 4096), 3, dtype=np.uint8)
    error = assert_rejected(name, one_page(name, payload), replica, match)
    assert "page 0" in str(error) and "byte offset" in str(error)


@pytest.mark.parametrize("name", RUN_FORMATS)
def test_empty_delta_is_rejected(name):
    assert_rejected(name, one_page(name, b""), np.zeros((1, 4096), np.uint8), "empty DELTA")


@pytest.mark.parametrize("name", RUN_FORMATS)
@pytest.mark.parametrize("kind, length", [(PageKind.FULL, 4095), (PageKind.FULL, 4097), (PageKind.ZERO, 1),
                                          (PageKind.UNCHANGED, 2), (PageKind.RAW, 10)])
def test_slices_of_the_wrong_length_for_their_kind(name, kind, length):
    assert_rejected(name, one_page(name, bytes(length), kind), np.zeros((1, 4096), np.uint8), "slice length")


@pytest.mark.parametrize("name", RUN_FORMATS)
@pytest.mark.parametrize("kind", [PageKind.NORMAL, 6, 200])
def test_unknown_kinds(name, kind):
    assert_rejected(name, one_page(name, b"", kind), np.zeros((1, 4096), np.uint8), "unknown page kind")


def test_error_names_the_failing_page_and_its_payload_offset(mixed_batch):
    encoded, cached = encoded_batch("native", mixed_batch)
    delta_pages = np.flatnonzero(encoded.kinds == PageKind.DELTA)
    page = int(delta_pages[-1])
    payload = encoded.payload.copy()
    start = int(encoded.offsets[page])
    payload[start] = 0xFF   # skip varint now continues into the next byte(s)
    payload[start + 1] = 0xFF
    payload[start + 2] = 0x7F
    error = assert_rejected("native", with_(encoded, payload=payload), cached.copy())
    assert f"page {page} " in str(error) and f"byte offset {start}" in str(error)


@pytest.mark.parametrize("name", RUN_FORMATS)
def test_bad_offsets(name, mixed_batch):
    encoded, cached = encoded_batch(name, mixed_batch)
    decreasing = encoded.offsets.copy()
    decreasing[3], decreasing[4] = decreasing[4] + 1, decreasing[3]
    not_from_zero = encoded.offsets + np.uint64(1)
    past_end = encoded.offsets.copy()
    past_end[-1] += np.uint64(1)
    huge = encoded.offsets.copy()
    huge[-1] = np.uint64(2**64 - 1)
    assert_rejected(name, with_(encoded, offsets=decreasing), cached.copy())   # a slice or an offset is wrong
    for offsets in (not_from_zero, past_end, huge):
        assert_rejected(name, with_(encoded, offsets=offsets), cached.copy(), "offsets")
    assert_rejected(name, with_(encoded, offsets=encoded.offsets[:-1]), cached.copy(), "offsets")


@pytest.mark.parametrize("name", ["native", "xen+lz4"])
def test_rows_outside_the_replica(name, mixed_batch):
    encoded, cached = encoded_batch(name, mixed_batch)
    n = cached.shape[0]
    for bad in (n, -1, 2**63):
        rows = np.arange(n, dtype=np.int64 if bad != 2**63 else np.uint64)
        rows[-1] = bad
        assert_rejected(name, encoded, cached.copy(), "row", rows=rows)


def test_page_count_must_match_the_replica(mixed_batch):
    encoded, cached = encoded_batch("native", mixed_batch)
    assert_rejected("native", encoded, cached[:-1].copy(), "replica has")


@pytest.mark.parametrize("raw_size", [-1, 10**12, "12", True])
def test_chain_rejects_raw_sizes_it_cannot_trust(mixed_batch, raw_size):
    encoded, cached = encoded_batch("native+zstd", mixed_batch)
    assert_rejected("native+zstd", with_(encoded, raw_size=raw_size), cached.copy(), "raw size")


def test_chain_rejects_offsets_that_disagree_with_raw_size(mixed_batch):
    encoded, cached = encoded_batch("native+lz4", mixed_batch)
    assert_rejected("native+lz4", with_(encoded, raw_size=encoded.raw_size - 1), cached.copy())
