"""frame and deframe: page batches survive the wire stream, and every structural fault is refused."""
from __future__ import annotations

import dataclasses
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import ENCODED, PAGES, STREAM, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.stage import StageContext
from stages.common import wire
from stages.codecs import Encoded, get_codec
from stages import framer
from stages.framer import Deframe, Frame, deframe_stream
from stages.common.wire import RecordType

PAGE = 4096
FIXTURES = Path(__file__).parent / "fixtures"
REGIONS = [{"name": "heap", "start": 0x7F0000000000, "first_page": 0, "npages": 64},
           {"name": "stack", "start": 0x7FFD00000000, "first_page": 100, "npages": 8}]


def random_pages(seed: int, npages: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (npages, PAGE), dtype=np.uint8)


def pages_batch(epoch: int, numbers, *, seed: int = 0, zero=(), flags: Flag = Flag.NONE) -> Batch:
    numbers = np.asarray(numbers, dtype=np.uint64)
    data = random_pages(seed, len(numbers))
    kinds = np.full(len(numbers), PageKind.NORMAL, dtype=np.uint8)
    for index in zero:
        data[index] = 0
        kinds[index] = PageKind.ZERO
    return Batch(format=PAGES, epoch=epoch, flags=flags, page_numbers=numbers, kinds=kinds, data=data)


def encoded_batch(chain: str, current: np.ndarray, cached: np.ndarray, numbers=None) -> Batch:
    """An ENCODED batch of epoch 1: ``current`` coded by ``chain`` against ``cached``, as pages ``numbers``
    (default 0, 1, ...)."""
    encoded = get_codec(chain).encode(current, cached.copy())
    numbers = np.arange(len(current), dtype=np.uint64) if numbers is None else numbers
    return Batch(format=ENCODED, epoch=1, page_numbers=numbers, kinds=encoded.kinds, payload=encoded.payload,
                 offsets=encoded.offsets, meta={"codec": encoded.codec, "raw_size": encoded.raw_size})


def decode_onto(replica: np.ndarray, batch: Batch) -> None:
    """Decode a deframed ENCODED batch onto the rows of ``replica`` its page numbers name."""
    chain = batch.meta["codec"]
    get_codec(chain).decode(Encoded(batch.payload, batch.offsets, batch.kinds, chain, batch.meta["raw_size"]),
                            replica, rows=batch.page_numbers)


def layout(epoch: int = 1, regions=REGIONS) -> Batch:
    return Batch.control(Flag.LAYOUT, epoch, regions=regions)


def epoch_end(epoch: int, pages: int, flags: Flag = Flag.NONE, **meta) -> Batch:
    return Batch.control(Flag.EPOCH_END | flags, epoch, pages=pages, **meta)


def end(epoch: int) -> Batch:
    return Batch.control(Flag.END_OF_STREAM, epoch)


def frame_all(batches, **properties) -> tuple[bytes, list[Batch]]:
    """The stream bytes frame writes for ``batches``, and everything it emitted."""
    stage = Frame(**properties)
    stage.start(StageContext("frame"))
    out = [framed for batch in batches for framed in stage.handle(batch)]
    return b"".join(b.payload.tobytes() for b in out if b.payload is not None), out


def deframe_all(data: bytes, chunk: int | None = None, **properties) -> list[Batch]:
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    return list(deframe_stream(chunks, **properties))


HANDMADE = wire.StreamHeader(PAGE, 1 << 20, bytes(range(1, 17)), "")


def stream_of(*records: tuple, header: wire.StreamHeader | None = None) -> bytes:
    """Hand-made stream: (type, epoch, body) records numbered from 0.

    A commit whose body is None gets the true counts and stream digest of the page records before it.
    """
    header = header or HANDMADE
    parts = [wire.encode_stream_header(header)]
    entries, checksums, layout_digest = 0, [], 0
    for sequence, (record_type, epoch, body) in enumerate(records):
        if body is None:
            body = wire.commit_body(wire.Commit(entries, len(checksums), wire.stream_digest(checksums),
                                                None, None, None, {}, layout_digest), header.version)
            entries, checksums = 0, []
        if record_type == RecordType.LAYOUT:
            layout_digest = wire.layout_digest(body)
        record, checksum = wire.encode_record(record_type, 0, epoch, sequence, body, header.checksum_seed)
        if record_type in (RecordType.PAGES, RecordType.ENCODED):
            entries += struct.unpack_from("<I", bytes(memoryview(body[0]).cast("B")))[0]
            checksums.append(checksum)
        parts.extend(bytes(memoryview(part).cast("B")) for part in record)
    return b"".join(parts)


def layout_record(epoch: int = 1, regions=REGIONS) -> tuple:
    return RecordType.LAYOUT, epoch, wire.layout_body(regions, {})


def pages_record(epoch: int, numbers) -> tuple:
    numbers = np.asarray(numbers, dtype=np.uint64)
    return (RecordType.PAGES, epoch, wire.pages_body(numbers, np.zeros(len(numbers), np.uint8),
                                                    np.ones((len(numbers), PAGE), np.uint8)))


def commit_record(epoch: int, pages: int | None = None, records: int = 0, stream_digest: int = 0) -> tuple:
    """A commit: the true one (pages None) or one claiming the given counts and digest."""
    if pages is None:
        return RecordType.EPOCH_COMMIT, epoch, None
    commit = wire.Commit(pages, records, stream_digest, None, None, None, {},
                         wire.layout_digest(wire.layout_body(REGIONS, {})))
    return RecordType.EPOCH_COMMIT, epoch, wire.commit_body(commit)


def whole(batch: Batch) -> np.ndarray:
    """The pages a deframed page batch carries: its data, or its whole-page encoding decoded."""
    if batch.format == PAGES:
        return batch.data
    pages = np.zeros((batch.npages, PAGE), dtype=np.uint8)
    get_codec(batch.meta["codec"]).decode(Encoded(batch.payload, batch.offsets, batch.kinds, batch.meta["codec"],
                                                  batch.meta["raw_size"]), pages)
    return pages


def data_batches(batches):
    return [b for b in batches if not b.is_control]


# ---- round trips --------------------------------------------------------------------

def test_pages_layout_and_epoch_ends_come_back_as_sent():
    sent = [layout(), pages_batch(1, [0, 1, 2, 101], zero=[1]), epoch_end(1, 4, digest=123, time=5.0, pause_ms=0.7),
            pages_batch(2, [3], seed=1, flags=Flag.RESYNC), epoch_end(2, 1, Flag.RESYNC, digest=9, note="x"), end(2)]
    got = deframe_all(frame_all(sent)[0])
    assert [(b.format, b.epoch, b.flags) for b in got] == [
        (PAGES, 1, Flag.LAYOUT), (PAGES, 1, Flag.NONE), (PAGES, 1, Flag.EPOCH_END), (PAGES, 2, Flag.RESYNC),
        (PAGES, 2, Flag.EPOCH_END | Flag.RESYNC), (PAGES, 2, Flag.END_OF_STREAM)]
    assert got[0].meta["regions"] == REGIONS
    for before, after in ((sent[1], got[1]), (sent[3], got[3])):
        assert after.page_numbers.tolist() == before.page_numbers.tolist()
        assert after.kinds.tolist() == before.kinds.tolist()
        assert np.array_equal(after.data, before.data)
    identity = got[0].meta["stream_id"]
    assert len(identity) == 32 and all(b.meta["stream_id"] == identity for b in got if b.is_control)
    assert got[2].meta == {"pages": 4, "digest": 123, "time": 5.0, "pause_ms": 0.7, "stream_id": identity}
    assert got[4].meta == {"pages": 1, "digest": 9, "note": "x", "stream_id": identity}


def test_numpy_scalars_in_marker_metadata_survive_the_wire():
    sent = [Batch.control(Flag.LAYOUT, 1, regions=REGIONS, generation=np.int64(3)), pages_batch(1, [0]),
            epoch_end(1, 1, digest=np.uint64(1 << 63), pause_ms=np.float32(0.5), sizes=np.arange(2)), end(1)]
    got = deframe_all(frame_all(sent)[0])
    assert got[0].meta["generation"] == 3
    assert got[2].meta == {"pages": 1, "digest": 1 << 63, "pause_ms": 0.5, "sizes": [0, 1],
                           "stream_id": got[0].meta["stream_id"]}


def test_the_stream_header_leads_the_first_output_even_after_a_held_layout():
    _, out = frame_all([layout(), pages_batch(1, [0]), epoch_end(1, 1), end(1)])
    stream_batches = [b for b in out if b.payload is not None]
    assert bytes(stream_batches[0].payload[:8]) == wire.MAGIC
    assert [b.flags for b in out if b.payload is None] == [Flag.LAYOUT, Flag.EPOCH_END, Flag.END_OF_STREAM]
    assert all(b.format == STREAM for b in out)


def test_the_header_declares_the_first_page_batch_codec_chain():
    pages = random_pages(3, 4)
    batch = encoded_batch("native+zstd", pages, np.zeros_like(pages))
    data, _ = frame_all([layout(), batch, epoch_end(1, 4), end(1)])
    header, _ = wire.parse_stream_header(memoryview(data))
    assert header.chain == "native+zstd" and header.page_size == PAGE


@pytest.mark.parametrize("chain", ["native", "native+zstd", "xbzrle+lz4", "xen"])
def test_encoded_batches_deframe_to_pages_the_codec_decodes(chain):
    rng = np.random.default_rng(4)
    before = rng.integers(0, 256, (6, PAGE), dtype=np.uint8)
    after = before.copy()
    after[:, 10:300] = 1
    after[5] = 0
    numbers = np.array([0, 1, 2, 3, 100, 107], dtype=np.uint64)
    batch = encoded_batch(chain, after, before, numbers)
    got = deframe_all(frame_all([layout(), batch, epoch_end(1, 6), end(1)])[0], chunk=1000)
    (received,) = data_batches(got)
    assert received.format == ENCODED and received.meta == {"codec": chain, "raw_size": batch.meta["raw_size"]}
    replica = np.zeros((108, PAGE), dtype=np.uint8)
    replica[numbers] = before
    decode_onto(replica, received)
    assert np.array_equal(replica[numbers], after)


@settings(max_examples=25, deadline=None)
@given(npages=st.integers(0, 40), limit_pages=st.integers(16, 40), seed=st.integers(0, 1000))
def test_big_page_batches_are_split_at_the_record_limit_and_rejoin(npages, limit_pages, seed):
    rng = np.random.default_rng(seed)
    numbers = rng.choice(64, npages, replace=False)
    batch = pages_batch(1, numbers, seed=seed, zero=[i for i in range(npages) if rng.random() < 0.3])
    limit = limit_pages * PAGE
    data, _ = frame_all([layout(), batch, epoch_end(1, npages), end(1)], max_record=limit)
    got = data_batches(deframe_all(data, max_record=limit))
    assert (len(got) > 0) == (npages > 0)      # deframe's own limit proves each record stayed within it
    assert np.concatenate([b.page_numbers for b in got] or [[]]).tolist() == batch.page_numbers.tolist()
    assert np.array_equal(np.concatenate([whole(b) for b in got] or [np.empty((0, PAGE), np.uint8)]), batch.data)


def test_an_encoded_batch_without_entropy_layer_is_split_by_entries():
    pages = random_pages(5, 40)
    batch = encoded_batch("native", pages, np.zeros_like(pages))
    data, _ = frame_all([layout(), batch, epoch_end(1, 40), end(1)], max_record=64 << 10)
    got = data_batches(deframe_all(data, max_record=64 << 10))
    assert len(got) == 3
    replica = np.zeros((64, PAGE), dtype=np.uint8)
    for part in got:
        decode_onto(replica, part)
    assert np.array_equal(replica[:40], pages)


def test_an_entropy_coded_batch_over_the_record_limit_is_a_config_error():
    pages = random_pages(6, 40)
    batch = encoded_batch("native+zstd", pages, np.zeros_like(pages))
    with pytest.raises(ConfigError, match="cannot be split"):
        frame_all([layout(), batch], max_record=64 << 10)


def test_frame_refuses_a_batch_of_another_epoch_while_one_is_open():
    with pytest.raises(ConfigError, match="batch of epoch 2 while epoch 1 is open"):
        frame_all([layout(), pages_batch(1, [0]), pages_batch(2, [1])])


def test_frame_warns_when_the_epoch_end_page_count_disagrees():
    warnings = []
    stage = Frame()
    stage.start(StageContext("frame", post=lambda kind, **fields: warnings.append(fields["message"])))
    for batch in (layout(), pages_batch(1, [0, 1]), epoch_end(1, 5)):
        list(stage.handle(batch))
    assert warnings == ["frame: epoch 1 end says 5 pages, 2 were framed"]


# ---- the frozen fixture ---------------------------------------------------------------

def summary(batch: Batch) -> dict:
    arrays = {name: xxhash.xxh3_64_hexdigest(np.ascontiguousarray(getattr(batch, name)).tobytes())
              for name in ("data", "payload", "offsets") if getattr(batch, name) is not None}
    return {"format": batch.format, "epoch": batch.epoch, "flags": int(batch.flags), "page_size": batch.page_size,
            "page_numbers": batch.page_numbers.tolist(), "kinds": batch.kinds.tolist(), "meta": batch.meta,
            "arrays": arrays}


def test_the_frozen_v1_stream_deframes_to_the_same_batches_forever():
    data = (FIXTURES / "stream-v1.pagepipe").read_bytes()
    expected = json.loads((FIXTURES / "stream-v1.expected.json").read_text())
    assert [summary(b) for b in deframe_all(data)] == expected
    assert [summary(b) for b in deframe_all(data, chunk=777)] == expected


def test_reframing_the_frozen_stream_as_version_1_writes_it_byte_for_byte():
    data = (FIXTURES / "stream-v1.pagepipe").read_bytes()
    assert frame_all(deframe_all(data), version=1)[0] == data


V2_IDENTITY = "5041474550495045" + "0000000000000002"


def test_the_frozen_v2_stream_deframes_to_the_same_batches_forever():
    data = (FIXTURES / "stream-v2.pagepipe").read_bytes()
    expected = json.loads((FIXTURES / "stream-v2.expected.json").read_text())
    assert [summary(b) for b in deframe_all(data)] == expected
    assert [summary(b) for b in deframe_all(data, chunk=333)] == expected
    assert {b["meta"]["stream_id"] for b in expected if not b["page_numbers"]} == {V2_IDENTITY}


def test_reframing_the_frozen_v2_stream_with_its_identity_writes_it_byte_for_byte():
    data = (FIXTURES / "stream-v2.pagepipe").read_bytes()
    assert frame_all(deframe_all(data), stream_id=V2_IDENTITY)[0] == data


def test_the_v1_and_v2_fixtures_carry_the_same_pages():
    old, new = (data_batches(deframe_all((FIXTURES / f"stream-v{v}.pagepipe").read_bytes())) for v in (1, 2))
    assert [(b.epoch, b.page_numbers.tolist(), b.kinds.tolist()) for b in old] == \
        [(b.epoch, b.page_numbers.tolist(), b.kinds.tolist()) for b in new]


# ---- structural faults ----------------------------------------------------------------

def test_a_page_outside_the_layout_is_refused_with_its_epoch():
    data = stream_of(layout_record(), pages_record(3, [0, 64]))
    with pytest.raises(CorruptData, match="page entry 1: page number 64 is outside the layout") as info:
        deframe_all(data)
    assert info.value.epoch == 3 and info.value.sequence == 1


def test_a_page_record_before_any_layout_is_refused():
    with pytest.raises(CorruptData, match="page record before any layout"):
        deframe_all(stream_of(pages_record(1, [0])))


def test_epochs_must_increase():
    data = stream_of(layout_record(), pages_record(2, [0]), commit_record(2), pages_record(2, [1]))
    with pytest.raises(CorruptData, match="epoch 2 after epoch 2 was committed"):
        deframe_all(data)


def test_a_commit_that_disagrees_with_the_records_received_is_refused():
    data = stream_of(layout_record(), pages_record(1, [0]), pages_record(1, [1]), commit_record(1, 1, 1))
    with pytest.raises(CorruptData, match="commit says 1 pages in 1 records.*received 2 pages in 2 records"):
        deframe_all(data)


def test_a_commit_whose_stream_digest_differs_is_refused_even_when_counts_agree():
    data = stream_of(layout_record(), pages_record(1, [0]), commit_record(1, 1, 1, stream_digest=12345))
    with pytest.raises(CorruptData, match="stream digest 0x3039"):
        deframe_all(data)


def test_a_codec_chain_the_receiver_does_not_know_is_refused_from_the_header():
    header = wire.StreamHeader(PAGE, 1 << 20, bytes(range(1, 17)), "brotli")
    with pytest.raises(CorruptData, match="codec chain 'brotli' is not known to this receiver"):
        deframe_all(stream_of(layout_record(), header=header))


def test_an_entropy_coder_alone_is_not_a_page_codec_chain():
    body = wire.encoded_body(np.array([0], np.uint64), np.array([PageKind.DELTA], np.uint8),
                             np.array([0, 3], np.uint64), np.zeros(3, np.uint8), "zstd", 3)
    with pytest.raises(CorruptData, match="'zstd' has no page format"):
        deframe_all(stream_of(layout_record(), (RecordType.ENCODED, 1, body)))


def test_a_stream_cut_inside_an_epoch_is_a_torn_epoch():
    data, _ = frame_all([layout(), pages_batch(1, [0]), epoch_end(1, 1), pages_batch(2, [1]), epoch_end(2, 1), end(2)])
    records = [item for item in wire.RecordReader().feed(data) if isinstance(item, wire.Record)]
    cut = records[4].offset             # after epoch 2's page record, before its commit
    with pytest.raises(CorruptData, match="epoch 2: stream ended inside an epoch") as info:
        deframe_all(data[:cut])
    assert info.value.epoch == 2


def test_a_stream_cut_inside_a_record_is_truncated():
    data, _ = frame_all([layout(), pages_batch(1, [0]), epoch_end(1, 1), end(1)])
    with pytest.raises(CorruptData, match="truncated inside a record"):
        deframe_all(data[:-5])


def test_a_stream_cut_after_a_commit_ends_with_a_warning_and_every_committed_epoch():
    data, _ = frame_all([layout(), pages_batch(1, [0]), epoch_end(1, 1), pages_batch(2, [1]), epoch_end(2, 1), end(2)])
    records = [item for item in wire.RecordReader().feed(data) if isinstance(item, wire.Record)]
    warnings = []
    context = StageContext("deframe", post=lambda kind, **fields: warnings.append(fields["message"]))
    got = list(deframe_stream([data[:records[3].offset]], context=context))
    assert [(b.epoch, b.flags) for b in got if b.is_control] == [
        (1, Flag.LAYOUT), (1, Flag.EPOCH_END), (1, Flag.END_OF_STREAM)]
    assert warnings == ["deframe: stream ended without its end-of-stream record, after epoch 1"]


def test_end_of_stream_record_inside_an_epoch_is_a_torn_epoch():
    data = stream_of(layout_record(), pages_record(1, [0]), (RecordType.END_OF_STREAM, 1, []))
    with pytest.raises(CorruptData, match="end of stream inside epoch 1"):
        deframe_all(data)


def test_a_record_after_the_end_of_stream_record_is_refused():
    data = stream_of(layout_record(), (RecordType.END_OF_STREAM, 0, []), layout_record())
    with pytest.raises(CorruptData, match="record after the end-of-stream record"):
        deframe_all(data)


def test_an_optional_record_of_an_unknown_type_is_skipped():
    data = stream_of(layout_record(), (wire.OPTIONAL_RECORD | 7, 1, [b"future"]), pages_record(1, [0]),
                     commit_record(1), (RecordType.END_OF_STREAM, 1, []))
    stage = Deframe()
    stage.start(StageContext("deframe"))
    got = list(stage.handle(Batch(format=STREAM, payload=np.frombuffer(data, np.uint8))))
    assert [b.flags for b in got] == [Flag.LAYOUT, Flag.NONE, Flag.EPOCH_END, Flag.END_OF_STREAM]
    assert stage.counters["skipped_records"] == 1 and stage.counters["records"] == 5


def test_an_empty_stream_is_refused():
    with pytest.raises(CorruptData, match=r"ended inside its header \(0 bytes\)"):
        deframe_all(b"")


def test_a_record_limit_smaller_than_the_records_is_refused():
    data, _ = frame_all([layout(), pages_batch(1, range(30)), epoch_end(1, 30), end(1)])
    with pytest.raises(CorruptData, match="exceeds the record limit of 65536"):
        deframe_all(data, max_record=64 << 10)


def reencoded(items: list) -> bytes:
    """Stream headers and records, possibly altered, re-encoded with valid checksums (as a hostile sender would)."""
    parts = []
    for item in items:
        if isinstance(item, wire.StreamHeader):
            parts.append(wire.encode_stream_header(item))
            continue
        encoded, _ = wire.encode_record(item.type, int(item.flags), item.epoch, item.sequence, [bytes(item.body)])
        parts.extend(bytes(memoryview(part).cast("B")) for part in encoded)
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hostile_record_bodies_with_valid_checksums_raise_only_corrupt_data(data):
    """Bodies altered behind valid checksums never crash deframe: it succeeds or raises CorruptData."""
    items = list(wire.RecordReader().feed((FIXTURES / "stream-v1.pagepipe").read_bytes()))
    index = data.draw(st.sampled_from([i for i, item in enumerate(items) if isinstance(item, wire.Record)]))
    body = bytearray(items[index].body)
    for _ in range(data.draw(st.integers(1, 4))):
        if body:
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del body[data.draw(st.integers(0, len(body))):]
    items[index] = dataclasses.replace(items[index], body=memoryview(bytes(body)))
    try:
        deframe_all(reencoded(items))
    except CorruptData:
        pass


def test_a_resync_epoch_opens_a_new_segment_that_deframes_seamlessly():
    sent = [layout(), pages_batch(1, [0]), epoch_end(1, 1), pages_batch(2, [0, 1], flags=Flag.RESYNC),
            epoch_end(2, 2, Flag.RESYNC), end(2)]
    data, _ = frame_all(sent)
    items = list(wire.RecordReader().feed(data))
    headers = [i for i, item in enumerate(items) if isinstance(item, wire.StreamHeader)]
    assert len(headers) == 2
    segment = items[headers[1] + 1:]
    assert [(r.type, r.sequence) for r in segment] == [
        (RecordType.LAYOUT, 0), (RecordType.PAGES, 1), (RecordType.EPOCH_COMMIT, 2), (RecordType.END_OF_STREAM, 3)]
    got = deframe_all(data)
    assert [b.flags for b in got] == [Flag.LAYOUT, Flag.NONE, Flag.EPOCH_END, Flag.RESYNC,
                                      Flag.EPOCH_END | Flag.RESYNC, Flag.END_OF_STREAM]


def test_a_receiver_that_resumes_mid_stream_starts_at_the_next_segment():
    sent = [layout(), pages_batch(1, [0]), epoch_end(1, 1), pages_batch(2, [1]), epoch_end(2, 1),
            pages_batch(3, [2, 3], flags=Flag.RESYNC), epoch_end(3, 2, Flag.RESYNC), end(3)]
    _, out = frame_all(sent)
    stream = [b for b in out if b.payload is not None]
    assert len(stream) == 4         # one message per epoch (its records wait for its commit), then the end
    stage = Deframe(resume=True)
    warnings: list[str] = []
    stage.start(StageContext("deframe", post=lambda kind, **fields: warnings.append(fields["message"])))
    got = [b for batch in stream[1:] for b in stage.handle(batch)]      # missed the first message
    assert [(b.epoch, b.flags) for b in got] == [(1, Flag.LAYOUT), (3, Flag.RESYNC), (3, Flag.EPOCH_END | Flag.RESYNC),
                                                 (3, Flag.END_OF_STREAM)]
    assert got[0].meta["regions"] == REGIONS and got[1].page_numbers.tolist() == [2, 3]
    assert stage.counters["skipped_bytes"] > 0
    assert warnings == ["deframe: joined a running stream; skipping it until the next segment "
                        "(a resync epoch) begins"]


def test_a_new_segment_inside_an_open_epoch_is_a_torn_epoch():
    data = stream_of(layout_record(), pages_record(4, [0])) + wire.encode_stream_header(
        dataclasses.replace(HANDMADE, segment=1))
    with pytest.raises(CorruptData, match="epoch 4: a new stream segment starts inside an epoch"):
        deframe_all(data)


# ---- heartbeats and a lost sender ----------------------------------------------------------

def stream_bytes(batches) -> bytes:
    return b"".join(b.payload.tobytes() for b in batches if b.payload is not None)


def test_frame_writes_heartbeats_only_while_quiet_between_header_and_end(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("stages.framer.time.monotonic", lambda: clock[0])
    stage = Frame(heartbeat="100ms")
    stage.start(StageContext("frame"))
    assert stage.tick_interval == pytest.approx(0.05)
    clock[0] += 1
    assert list(stage.tick()) == []              # no stream header yet: nothing to say
    written = [out for batch in (layout(), pages_batch(1, [0, 1]), epoch_end(1, 2)) for out in stage.handle(batch)]
    clock[0] += 0.05
    assert list(stage.tick()) == []              # output 50 ms ago: not quiet long enough
    clock[0] += 0.06
    beats = list(stage.tick())
    assert len(beats) == 1 and beats[0].epoch == 1 and not beats[0].is_control
    assert list(stage.tick()) == []              # just written
    clock[0] += 0.2
    beats += list(stage.tick())
    written += beats + [out for out in stage.handle(end(1))]
    clock[0] += 1
    assert list(stage.tick()) == []              # after the end of the stream: silence is fine
    data = stream_bytes(written)
    deframe = Deframe()
    deframe.start(StageContext("deframe"))
    batches = list(deframe.handle(Batch(format=STREAM, payload=np.frombuffer(data, dtype=np.uint8))))
    assert deframe.counters["heartbeats"] == 2 and stage.counters["heartbeats"] == 2
    assert [Flag(b.flags).name for b in batches if b.is_control] == ["LAYOUT", "EPOCH_END", "END_OF_STREAM"]


def test_a_heartbeat_inside_an_epoch_does_not_count_as_one_of_its_records(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("stages.framer.time.monotonic", lambda: clock[0])
    stage = Frame(heartbeat="10ms")
    stage.start(StageContext("frame"))
    written = [out for batch in (layout(), pages_batch(1, [0])) for out in stage.handle(batch)]
    clock[0] += 1
    written += list(stage.tick())
    written += [out for batch in (pages_batch(1, [1], seed=1), epoch_end(1, 2), end(1)) for out in stage.handle(batch)]
    batches = deframe_all(stream_bytes(written))
    assert [b.epoch for b in batches if b.flags & Flag.EPOCH_END] == [1]
    assert sum(b.npages for b in batches) == 2


def test_deframe_passes_a_lost_sender_on_and_waits_for_a_new_segment():
    frame = Frame(heartbeat="1ms")
    frame.start(StageContext("frame"))
    sent = [out for batch in [layout(), pages_batch(1, [0, 1]), epoch_end(1, 2), pages_batch(2, [3])]
            for out in frame.handle(batch)]
    time.sleep(0.01)
    sent += list(frame.tick())  # the heartbeat takes the open epoch's records along: then the sender dies
    first = b"".join(b.payload.tobytes() for b in sent if b.payload is not None)
    deframe = Deframe()
    deframe.start(StageContext("deframe"))
    out = list(deframe.handle(Batch(format=STREAM, payload=np.frombuffer(first, dtype=np.uint8))))
    lost = list(deframe.handle(Batch.control(Flag.SENDER_LOST, 0, format=STREAM, silence=1.0)))
    assert len(lost) == 1 and lost[0].flags & Flag.SENDER_LOST
    assert lost[0].epoch == 1 and lost[0].meta["open_epoch"] == 2 and lost[0].meta["silence"] == 1.0
    stale, _ = frame_all([layout(), pages_batch(7, [0]), epoch_end(7, 1)])   # a stream joined in the middle
    middle = np.frombuffer(stale[-40:], dtype=np.uint8)   # the rest of a record: not where a segment starts
    assert list(deframe.handle(Batch(format=STREAM, payload=middle))) == []
    assert deframe.counters["skipped_bytes"] == 40
    again = list(deframe.handle(Batch(format=STREAM, payload=np.frombuffer(stale, dtype=np.uint8))))
    assert [b.epoch for b in again if b.flags & Flag.EPOCH_END] == [7]
    assert len(out) >= 3


# ---- version 2: stream identity, layout digest, stream offsets (issue 10) ------------------

def segment_header(identity: bytes, segment: int) -> bytes:
    return wire.encode_stream_header(wire.StreamHeader(PAGE, 1 << 20, identity, "", segment))


def test_frame_writes_the_chosen_identity_in_every_segment_and_deframe_reports_it():
    identity = "0123456789abcdef" * 2
    sent = [layout(), pages_batch(1, [0]), epoch_end(1, 1), pages_batch(2, [0, 1], flags=Flag.RESYNC),
            epoch_end(2, 2, Flag.RESYNC), end(2)]
    data, _ = frame_all(sent, stream_id=identity)
    headers = [item for item in wire.RecordReader().feed(data) if isinstance(item, wire.StreamHeader)]
    assert [(h.stream_hex, h.segment, h.version) for h in headers] == [(identity, 0, 2), (identity, 1, 2)]
    assert {b.meta["stream_id"] for b in deframe_all(data) if b.is_control} == {identity}


def test_every_frame_draws_a_fresh_random_identity():
    data = [frame_all([layout(), pages_batch(1, [0]), epoch_end(1, 1), end(1)])[0] for _ in range(2)]
    first, second = (wire.parse_stream_header(memoryview(d))[0].stream_id for d in data)
    assert first != second and len(first) == 16


def test_a_segment_of_another_stream_is_refused_without_resume():
    data = stream_of(layout_record(), pages_record(1, [0]), commit_record(1))
    intruder = dataclasses.replace(HANDMADE, stream_id=bytes(range(2, 18)))
    data += stream_of(layout_record(2), pages_record(999999, [1]), commit_record(999999), header=intruder)
    with pytest.raises(CorruptData, match="a segment of another stream .* inside stream") as info:
        deframe_all(data)
    assert info.value.offset == data.index(wire.encode_stream_header(intruder))


def test_with_resume_another_stream_starts_a_new_epoch_order_and_is_named():
    data = stream_of(layout_record(), pages_record(5, [0]), commit_record(5))
    intruder = dataclasses.replace(HANDMADE, stream_id=bytes(range(2, 18)))
    data += stream_of(layout_record(1), pages_record(1, [1]), commit_record(1), header=intruder)
    got = deframe_all(data, resume=True)
    ends = [(b.epoch, b.meta["stream_id"]) for b in got if b.flags & Flag.EPOCH_END]
    assert ends == [(5, HANDMADE.stream_hex), (1, intruder.stream_hex)]


def test_a_stale_segment_of_the_same_stream_is_refused():
    data = stream_of(layout_record(), pages_record(1, [0]), commit_record(1))
    data += stream_of(layout_record(2), pages_record(2, [1]), commit_record(2), header=HANDMADE)   # segment 0 again
    with pytest.raises(CorruptData, match="stale segment 0 of this stream after segment 0"):
        deframe_all(data)


def test_a_segment_of_the_same_stream_keeps_the_epoch_order():
    data = stream_of(layout_record(), pages_record(4, [0]), commit_record(4))
    data += stream_of(layout_record(2), pages_record(2, [1]), commit_record(2),
                      header=dataclasses.replace(HANDMADE, segment=1))
    with pytest.raises(CorruptData, match="epoch 2 after epoch 4 was committed"):
        deframe_all(data)


def test_records_of_another_stream_fail_their_checksum():
    data = stream_of(layout_record(), pages_record(1, [0]), commit_record(1))
    other = dataclasses.replace(HANDMADE, stream_id=bytes(range(2, 18)))
    spliced = data[:len(wire.encode_stream_header(HANDMADE))] + stream_of(
        layout_record(), pages_record(1, [0]), commit_record(1), header=other)[len(wire.encode_stream_header(other)):]
    with pytest.raises(CorruptData, match="record checksum mismatch"):
        deframe_all(spliced)


def test_a_layout_altered_behind_a_recomputed_checksum_cannot_be_committed():
    grown = [dict(REGIONS[0], npages=13_000_000), REGIONS[1]] if REGIONS[1]["first_page"] > 13_000_000 else \
        [REGIONS[0], dict(REGIONS[1], npages=13_000_000)]
    records = [layout_record(), pages_record(1, [0]), commit_record(1)]
    honest = stream_of(*records)
    header_size = len(wire.encode_stream_header(HANDMADE))
    forged_layout = stream_of(layout_record(regions=grown))[header_size:]       # valid checksum, other regions
    commit_digest = wire.layout_digest(wire.layout_body(REGIONS, {}))
    items = [item for item in wire.RecordReader().feed(honest) if isinstance(item, wire.Record)]
    forged = honest[:header_size] + forged_layout + honest[header_size + 32 + len(items[0].body):]
    with pytest.raises(CorruptData, match=f"layout digest {commit_digest:#x}, the layout in force"):
        deframe_all(forged)


def test_damage_in_a_later_segment_header_is_reported_at_its_stream_offset():
    data = stream_of(layout_record(), pages_record(1, [0]), commit_record(1))
    second = bytearray(segment_header(HANDMADE.stream_id, 1))
    second[-1] ^= 0xFF
    with pytest.raises(CorruptData, match="stream header checksum mismatch") as info:
        deframe_all(data + bytes(second))
    assert info.value.offset == len(data) + len(second) - 8


def test_a_reserved_record_type_is_named_when_refused():
    data = stream_of(layout_record(), (0x0006, 1, [b"channel"]))
    with pytest.raises(CorruptData, match="reserved for CHANNEL"):
        deframe_all(data)


def test_a_page_record_of_many_entries_is_cut_into_batches_of_views(monkeypatch):
    monkeypatch.setattr(framer, "MAX_BATCH_ENTRIES", 4)
    numbers = list(range(10))
    sent = [layout(), pages_batch(1, numbers, zero=[1, 2, 3, 4, 5, 6]), epoch_end(1, 10), end(1)]
    data, _ = frame_all(sent)
    got = data_batches(deframe_all(data))
    assert [b.npages for b in got] == [4, 4, 2]
    assert np.concatenate([b.page_numbers for b in got]).tolist() == numbers
    np.testing.assert_array_equal(np.concatenate([whole(b) for b in got]), sent[1].data)


def test_an_unknown_chain_in_a_later_segment_header_is_reported_at_that_header():
    data = stream_of(layout_record(), pages_record(1, [0]), commit_record(1))
    later = wire.encode_stream_header(dataclasses.replace(HANDMADE, chain="brotli", segment=1))
    with pytest.raises(CorruptData, match="codec chain 'brotli'") as info:
        deframe_all(data + later)
    assert info.value.offset == len(data)
