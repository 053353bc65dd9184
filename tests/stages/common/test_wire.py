"""The wire stream's bytes (stages.common.wire): header, records, checksums, sequence, bodies, and hostile input."""
from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import PageKind
from pipeline.errors import CorruptData
from stages.common import wire
from stages.common.wire import Record, RecordFlag, RecordReader, RecordType, StreamHeader

PAGE = 4096
HEADER = StreamHeader(page_size=PAGE, record_limit=1 << 20, stream_id=bytes(range(1, 17)), chain="native+zstd")
REGIONS = [{"name": "heap", "start": 0x7F0000000000, "first_page": 0, "npages": 16},
           {"name": "stack", "start": 0x7FFD00000000, "first_page": 16, "npages": 4}]


def record_bytes(record_type: int, body: list, *, sequence: int, epoch: int = 1, flags: int = 0) -> bytes:
    parts, _ = wire.encode_record(record_type, flags, epoch, sequence, body, HEADER.checksum_seed)
    return b"".join(bytes(memoryview(part).cast("B")) for part in parts)


def small_stream() -> bytes:
    """Header, layout, one pages record, a commit and end of stream."""
    numbers = np.array([0, 3, 17], dtype=np.uint64)
    kinds = np.array([PageKind.NORMAL, PageKind.ZERO, PageKind.RAW], dtype=np.uint8)
    data = np.zeros((3, PAGE), dtype=np.uint8)
    data[0] = 1
    data[2] = 2
    pages = record_bytes(RecordType.PAGES, wire.pages_body(numbers, kinds, data), sequence=1)
    checksum = struct.unpack_from("<Q", pages, 24)[0]
    commit = wire.Commit(pages=3, records=1, stream_digest=wire.stream_digest([checksum]), digest=5,
                         time=None, pause_ms=0.5, extra={})
    return b"".join([
        wire.encode_stream_header(HEADER),
        record_bytes(RecordType.LAYOUT, wire.layout_body(REGIONS, {}), sequence=0),
        pages,
        record_bytes(RecordType.EPOCH_COMMIT, wire.commit_body(commit), sequence=2),
        record_bytes(RecordType.END_OF_STREAM, [], sequence=3),
    ])


def read_all(data: bytes, *chunk_sizes: int, limit: int = 1 << 20) -> tuple[RecordReader, list[Record]]:
    reader = RecordReader(limit)
    items, position = [], 0
    for size in chunk_sizes or (len(data),):
        items.extend(reader.feed(data[position:position + size]))
        position += size
    items.extend(reader.feed(data[position:]))
    return reader, [item for item in items if isinstance(item, Record)]


def header_only_reader() -> RecordReader:
    reader = RecordReader(1 << 20)
    assert list(reader.feed(wire.encode_stream_header(HEADER))) == [HEADER]
    return reader


# ---- stream header ----------------------------------------------------------------

def test_stream_header_round_trips_and_is_a_multiple_of_eight_bytes():
    raw = wire.encode_stream_header(HEADER)
    parsed, size = wire.parse_stream_header(memoryview(raw))
    assert parsed == HEADER
    assert size == len(raw) and size % 8 == 0 and raw.startswith(b"PAGEPIPE")


def test_stream_header_with_bad_magic_is_refused_at_offset_zero():
    raw = b"NOTPAGEP" + wire.encode_stream_header(HEADER)[8:]
    with pytest.raises(CorruptData, match="magic") as info:
        wire.parse_stream_header(memoryview(raw))
    assert info.value.offset == 0


def test_stream_header_of_a_future_version_is_refused():
    raw = bytearray(wire.encode_stream_header(HEADER))
    raw[8] = 3
    with pytest.raises(CorruptData, match="unsupported stream version 3"):
        wire.parse_stream_header(memoryview(raw))


def test_stream_header_with_a_flipped_byte_fails_its_checksum():
    raw = bytearray(wire.encode_stream_header(HEADER))
    raw[14] ^= 0x01          # page size
    with pytest.raises(CorruptData, match="header checksum"):
        wire.parse_stream_header(memoryview(raw))


def test_stream_header_needs_more_bytes_when_cut_short():
    raw = wire.encode_stream_header(HEADER)
    assert wire.parse_stream_header(memoryview(raw[:5])) is None
    assert wire.parse_stream_header(memoryview(raw[:len(raw) - 1])) is None


# ---- records ----------------------------------------------------------------------

def test_records_are_read_back_whole_in_order_with_their_fields():
    reader, records = read_all(small_stream())
    assert reader.header == HEADER
    assert [r.type for r in records] == [RecordType.LAYOUT, RecordType.PAGES, RecordType.EPOCH_COMMIT,
                                         RecordType.END_OF_STREAM]
    assert [r.sequence for r in records] == [0, 1, 2, 3]
    assert reader.partial_bytes == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=9000), max_size=12))
def test_records_are_the_same_whatever_the_chunk_boundaries(chunk_sizes):
    data = small_stream()
    _, whole = read_all(data)
    _, chunked = read_all(data, *chunk_sizes)
    assert [(r.type, r.sequence, r.checksum, bytes(r.body)) for r in chunked] == \
           [(r.type, r.sequence, r.checksum, bytes(r.body)) for r in whole]


def test_a_record_inside_one_chunk_is_a_view_of_it_not_a_copy():
    data = bytearray(small_stream())
    header, layout, pages, *_ = RecordReader(1 << 20).feed(data)
    assert np.shares_memory(np.frombuffer(pages.body, dtype=np.uint8), np.frombuffer(data, dtype=np.uint8))


def test_a_record_with_a_flipped_body_byte_fails_its_checksum_naming_record_and_offset():
    data = bytearray(small_stream())
    _, records = read_all(bytes(data))
    pages = records[1]
    data[pages.offset + wire.RECORD_HEADER_SIZE + 40] ^= 0x80
    with pytest.raises(CorruptData, match=r"record #1, byte offset \d+: record checksum mismatch") as info:
        read_all(bytes(data))
    assert info.value.sequence == 1 and info.value.offset == pages.offset


def test_a_missing_record_is_a_sequence_gap():
    reader = header_only_reader()
    list(reader.feed(record_bytes(RecordType.END_OF_STREAM, [], sequence=0)))
    with pytest.raises(CorruptData, match="sequence gap: expected record #1, found #2") as info:
        list(reader.feed(record_bytes(RecordType.END_OF_STREAM, [], sequence=2, epoch=9)))
    assert info.value.epoch == 9


def test_a_record_over_the_limit_is_refused_before_its_body_arrives():
    reader = RecordReader(record_limit=1 << 16)
    assert list(reader.feed(wire.encode_stream_header(HEADER))) == [HEADER]
    big = record_bytes(RecordType.PAGES, [bytes(1 << 17)], sequence=0)
    with pytest.raises(CorruptData, match="exceeds the record limit of 65536"):
        list(reader.feed(big[:wire.RECORD_HEADER_SIZE]))


def test_an_unknown_mandatory_record_type_is_an_error():
    reader = header_only_reader()
    with pytest.raises(CorruptData, match="unknown mandatory record type 0x0042"):
        list(reader.feed(record_bytes(0x0042, [b"x"], sequence=0)))


def test_an_unknown_optional_record_type_is_passed_up_for_skipping():
    reader = header_only_reader()
    (record,) = reader.feed(record_bytes(wire.OPTIONAL_RECORD | 0x42, [b"note"], sequence=0))
    assert record.type == 0x8042 and bytes(record.body) == b"note"


def test_unknown_record_flags_are_an_error():
    reader = header_only_reader()
    with pytest.raises(CorruptData, match="unknown record flags 0x4"):
        list(reader.feed(record_bytes(RecordType.END_OF_STREAM, [], sequence=0, flags=4)))


def test_a_stream_header_at_a_record_boundary_starts_a_new_segment_numbered_from_zero():
    reader = header_only_reader()
    list(reader.feed(record_bytes(RecordType.END_OF_STREAM, [], sequence=0)))
    restarted = StreamHeader(page_size=PAGE, record_limit=1 << 20, stream_id=HEADER.stream_id, chain="native",
                             segment=1)
    items = list(reader.feed(wire.encode_stream_header(restarted) + record_bytes(RecordType.LAYOUT,
                                                                            wire.layout_body(REGIONS, {}), sequence=0)))
    assert items[0] == restarted and items[1].sequence == 0 and reader.header == restarted


def test_a_record_cut_short_is_held_as_partial_bytes():
    data = small_stream()
    reader, records = read_all(data[:-10])
    assert len(records) == 3 and reader.partial_bytes == wire.RECORD_HEADER_SIZE - 10


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_flipped_byte_in_a_stream_is_caught_or_left_partial(data):
    """A single corrupted byte never yields a record that differs from the one written."""
    original = small_stream()
    position = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    damaged = bytearray(original)
    damaged[position] ^= 1 << bit
    try:
        reader, records = read_all(bytes(damaged))
    except CorruptData:
        return
    # Only a length field can make the reader wait for more bytes instead of failing.
    assert reader.partial_bytes > 0
    _, clean = read_all(original)
    assert [bytes(r.body) for r in records] == [bytes(r.body) for r in clean[:len(records)]]


# ---- bodies -----------------------------------------------------------------------

def parsed(record_type: int, body: list, *, epoch: int = 1) -> Record:
    reader = header_only_reader()
    (record,) = reader.feed(record_bytes(record_type, body, sequence=0, epoch=epoch))
    return record


def test_layout_round_trips_regions_and_extra_metadata():
    regions, extra = wire.parse_layout(parsed(RecordType.LAYOUT, wire.layout_body(REGIONS, {"vanished": [[20, 4]]})))
    assert regions == REGIONS and extra == {"vanished": [[20, 4]]}


def test_layout_carries_the_dtype_and_shape_of_array_regions():
    arrays = [dict(REGIONS[0], dtype="<f8", shape=[16, 512]), REGIONS[1]]
    regions, extra = wire.parse_layout(parsed(RecordType.LAYOUT, wire.layout_body(arrays, {"tracking": "uffd"})),
                                       page_size=4096)
    assert regions == arrays and extra == {"tracking": "uffd"}


@pytest.mark.parametrize("arrays, problem", [
    ({"0": {"dtype": "O", "shape": [1]}}, "Python objects"),
    ({"0": {"dtype": "<f8", "shape": [10 ** 9]}}, "does not fit"),
    ({"9": {"dtype": "<f8", "shape": [1]}}, "names no region"),
    ([1], "not a JSON object")])
def test_layout_array_metadata_is_checked(arrays, problem):
    body = wire.layout_body(REGIONS, {wire.REGION_ARRAYS: arrays})
    with pytest.raises(CorruptData, match=problem):
        wire.parse_layout(parsed(RecordType.LAYOUT, body), page_size=4096)


def test_heartbeat_round_trips_and_is_an_optional_record():
    assert RecordType.HEARTBEAT & wire.OPTIONAL_RECORD
    beat = wire.parse_heartbeat(parsed(RecordType.HEARTBEAT, wire.heartbeat_body(wire.Heartbeat(1.5e9, 100))))
    assert beat == wire.Heartbeat(1.5e9, 100)
    with pytest.raises(CorruptData, match="unexpected bytes"):
        wire.parse_heartbeat(parsed(RecordType.HEARTBEAT, wire.heartbeat_body(wire.Heartbeat(1.0, 1)) + [b"x"]))


def test_overlapping_layout_regions_are_refused():
    overlapping = [dict(REGIONS[0]), dict(REGIONS[1], first_page=10)]
    with pytest.raises(CorruptData, match="'heap' and 'stack' overlap"):
        wire.parse_layout(parsed(RecordType.LAYOUT, wire.layout_body(overlapping, {})))


def test_layout_with_more_regions_than_its_body_holds_is_refused():
    body = wire.layout_body(REGIONS, {})
    body[0] = struct.pack("<II", 1000, 0)
    with pytest.raises(CorruptData, match="layout region 2: needs"):
        wire.parse_layout(parsed(RecordType.LAYOUT, body))


def test_layout_metadata_that_is_not_a_json_object_is_refused():
    body = wire.layout_body(REGIONS, {})
    body[-1] = struct.pack("<I", 3) + b"[1]"
    with pytest.raises(CorruptData, match="not a JSON object"):
        wire.parse_layout(parsed(RecordType.LAYOUT, body))


def test_layout_metadata_nested_absurdly_deep_is_refused():
    body = wire.layout_body(REGIONS, {})
    body[-1] = struct.pack("<I", 60000) + b"[" * 60000
    with pytest.raises(CorruptData, match="metadata is not JSON"):
        wire.parse_layout(parsed(RecordType.LAYOUT, body))


def test_pages_body_drops_zero_pages_and_never_expands_them():
    numbers = np.array([5, 6, 7], dtype=np.uint64)
    kinds = np.array([PageKind.ZERO, PageKind.NORMAL, PageKind.ZERO], dtype=np.uint8)
    data = np.full((3, PAGE), 9, dtype=np.uint8)
    body = wire.pages_body(numbers, kinds, data)
    assert sum(memoryview(part).nbytes for part in body) == 8 + 9 * 3 + PAGE
    got_numbers, got_kinds, rows = wire.parse_pages(parsed(RecordType.PAGES, body), PAGE)
    assert got_numbers.tolist() == [5, 6, 7] and got_kinds.tolist() == kinds.tolist()
    assert rows.shape == (1, PAGE) and (rows == 9).all()
    expanded = wire.expand_pages(got_kinds, rows)
    assert not expanded[0].any() and (expanded[1] == 9).all() and not expanded[2].any()


def test_pages_body_whose_data_count_disagrees_with_its_kinds_is_refused():
    body = wire.pages_body(np.array([1], np.uint64), np.array([PageKind.NORMAL], np.uint8), np.ones((1, PAGE), np.uint8))
    body[0] = struct.pack("<II", 1, 0)
    with pytest.raises(CorruptData, match="0 pages with data announced, kinds say 1"):
        wire.parse_pages(parsed(RecordType.PAGES, body), PAGE)


def test_pages_body_with_an_unknown_kind_is_refused():
    body = wire.pages_body(np.array([1], np.uint64), np.array([0], np.uint8), np.ones((1, PAGE), np.uint8))
    body[2] = np.array([77], np.uint8)
    with pytest.raises(CorruptData, match="page entry 0: unknown page kind 77"):
        wire.parse_pages(parsed(RecordType.PAGES, body), PAGE)


def encoded(lengths: list[int], kinds: list[int], *, chain: str = "native", raw_size: int | None = None,
            payload_len: int | None = None) -> list:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
    payload = np.arange(payload_len if payload_len is not None else int(offsets[-1]), dtype=np.uint64).astype(np.uint8)
    return wire.encoded_body(np.arange(len(lengths), dtype=np.uint64), np.array(kinds, np.uint8), offsets, payload,
                             chain, int(offsets[-1]) if raw_size is None else raw_size)


def test_encoded_body_round_trips_offsets_chain_and_raw_size():
    body = encoded([PAGE, 10, 0], [PageKind.FULL, PageKind.DELTA, PageKind.UNCHANGED])
    pages = wire.parse_encoded(parsed(RecordType.ENCODED, body), PAGE)
    assert pages.offsets.tolist() == [0, PAGE, PAGE + 10, PAGE + 10]
    assert pages.chain == "native" and pages.raw_size == PAGE + 10 and len(pages.payload) == PAGE + 10


def test_encoded_full_entry_must_be_exactly_one_page():
    body = encoded([PAGE - 1], [PageKind.FULL])
    with pytest.raises(CorruptData, match="page entry 0: kind FULL is 4095 bytes, not one page of 4096"):
        wire.parse_encoded(parsed(RecordType.ENCODED, body), PAGE)


def test_encoded_lengths_must_sum_to_the_raw_size():
    body = encoded([10, 20], [PageKind.DELTA, PageKind.DELTA], chain="native+zstd", raw_size=31, payload_len=12)
    with pytest.raises(CorruptData, match="entry lengths sum to 30, raw size says 31"):
        wire.parse_encoded(parsed(RecordType.ENCODED, body), PAGE)


def test_encoded_payload_without_entropy_layer_must_be_the_raw_size():
    body = encoded([10], [PageKind.DELTA], payload_len=9)
    with pytest.raises(CorruptData, match="no entropy layer but payload is 9 bytes"):
        wire.parse_encoded(parsed(RecordType.ENCODED, body), PAGE)


def test_encoded_entry_longer_than_two_pages_is_refused():
    body = encoded([3 * PAGE], [PageKind.DELTA])
    with pytest.raises(CorruptData, match="longer than two pages"):
        wire.parse_encoded(parsed(RecordType.ENCODED, body), PAGE)


def test_encoded_chain_must_be_printable_ascii():
    body = encoded([10], [PageKind.DELTA])
    body[0] = body[0][:-6] + b"nat\x00ve"
    with pytest.raises(CorruptData, match="not printable ASCII"):
        wire.parse_encoded(parsed(RecordType.ENCODED, body), PAGE)


def test_commit_round_trips_optional_fields_and_extra_metadata():
    commit = wire.Commit(pages=3, records=2, stream_digest=99, digest=(1 << 64) - 1, time=12.5, pause_ms=None,
                         extra={"note": "x"}, layout_digest=77)
    assert wire.parse_commit(parsed(RecordType.EPOCH_COMMIT, wire.commit_body(commit))) == commit
    absent = wire.Commit(pages=0, records=0, stream_digest=0, digest=None, time=None, pause_ms=None, extra={},
                         layout_digest=0)
    assert wire.parse_commit(parsed(RecordType.EPOCH_COMMIT, wire.commit_body(absent))) == absent
    version_1 = dataclasses.replace(commit, layout_digest=None)
    assert wire.parse_commit(parsed(RecordType.EPOCH_COMMIT, wire.commit_body(version_1, 1)), 1) == version_1


def test_a_body_with_trailing_bytes_is_refused():
    with pytest.raises(CorruptData, match="1 unexpected bytes"):
        wire.parse_end_of_stream(parsed(RecordType.END_OF_STREAM, [b"x"]))


def test_record_flags_carry_resync():
    reader = header_only_reader()
    (record,) = reader.feed(record_bytes(RecordType.END_OF_STREAM, [], sequence=0, flags=RecordFlag.RESYNC))
    assert record.flags == RecordFlag.RESYNC
