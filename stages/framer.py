"""`frame` and `deframe`: page batches to the wire stream and back (docs/FORMAT.md, wire-stream).

frame writes the stream header with its first output, one or more records
per page batch (split at the record limit), a layout record per LAYOUT, an
epoch-commit record per EPOCH_END and an end-of-stream record. deframe checks
everything structural (via ``stages.common.wire``) plus what needs stream state:
epochs open and close in order, page numbers fall inside the current layout,
codec chains are known here, and each commit matches the records the epoch
actually had. It does not decode page contents.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.batch import ANY, ENCODED, PAGES, STREAM, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData, PagepipeError
from pipeline.stage import Property, Stage, StageContext

from .codecs import is_entropy_coded
from .common import wire
from .common.checks import check_encoded_batch
from .common.wire import Commit, Record, RecordFlag, RecordType

_MIN_RECORD_LIMIT = 64 << 10
_MAX_RECORD_LIMIT = 1 << 30


def _record_flags(flags: Flag) -> int:
    return int(RecordFlag.RESYNC) if flags & Flag.RESYNC else 0


def _batch_flags(record: Record) -> Flag:
    return Flag.RESYNC if record.flags & RecordFlag.RESYNC else Flag.NONE


class Frame(Stage):
    factory_name = "frame"
    description = "Frame page batches as the versioned, checksummed wire stream with epoch commits"
    input_caps = (PAGES, ENCODED)
    output_caps = STREAM
    max_workers = 1

    max_record = Property("size", "16MiB", "Largest record body written; bigger page batches are split",
                          minimum=_MIN_RECORD_LIMIT, maximum=_MAX_RECORD_LIMIT)
    codec = Property("str", "", "Codec chain declared in the stream header (default: the first page batch's)")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._header: wire.StreamHeader | None = None
        self._held: list = []               # record parts written before the header could be
        self._layout: tuple[Batch, list] | None = None      # the last LAYOUT and its record body
        self._sequence = 0
        self._open_epoch: int | None = None
        self._epoch_entries = 0
        self._epoch_checksums: list[int] = []
        self.counters.update(records=0, segments=1, bytes_out=0)

    # ---- page batches ---------------------------------------------------------
    def process(self, batch: Batch) -> Iterator[Batch]:
        if batch.format not in self.input_caps:
            raise ConfigError(f"{self.factory_name}: cannot frame a {batch.format!r} batch")
        chain = str(batch.meta.get("codec", "")) if batch.format == ENCODED else ""
        if batch.format == ENCODED and not chain:
            raise ConfigError(f"{self.factory_name}: encoded batch of epoch {batch.epoch} names no codec chain")
        if batch.format == ENCODED:
            check_encoded_batch(batch, self.factory_name)
        parts: list = []
        self._declare(batch, self.codec or chain, parts)
        self._enter_epoch(batch.epoch)
        for body in self._page_bodies(batch, chain):
            checksum = self._append(parts, RecordType.ENCODED if chain else RecordType.PAGES, batch, body)
            self._epoch_checksums.append(checksum)
        self._epoch_entries += batch.npages
        yield self._stream_batch(batch, parts)

    def _page_bodies(self, batch: Batch, chain: str) -> Iterator[list]:
        """Record bodies for the batch, split so that none exceeds the record limit."""
        if not chain:
            if batch.data is None and np.any(batch.kinds != PageKind.ZERO):
                raise ConfigError(f"{self.factory_name}: pages batch of epoch {batch.epoch} has no data")
            carries = batch.kinds != PageKind.ZERO
            costs = wire.PAGES_ENTRY_SIZE + carries.astype(np.int64) * batch.page_size
            budget = self.max_record - wire.pages_body_size(0, 0, batch.page_size)
            for start, end in _split(costs, budget, self.factory_name):
                data = batch.data[start:end] if batch.data is not None else None
                yield wire.pages_body(batch.page_numbers[start:end], batch.kinds[start:end], data)
            return
        offsets = np.asarray(batch.offsets, dtype=np.uint64)
        raw_size = int(batch.meta.get("raw_size", int(offsets[-1])))
        if raw_size != int(offsets[-1]):
            raise CorruptData(f"{self.factory_name}: encoded batch of epoch {batch.epoch} has raw_size {raw_size} "
                              f"but its offsets end at {int(offsets[-1])}")
        if is_entropy_coded(chain):        # one entropy frame over the whole batch: it cannot be cut
            size = wire.encoded_body_size(batch.npages, len(batch.payload), chain)
            if size > self.max_record:
                raise ConfigError(
                    f"{self.factory_name}: a {chain!r} batch of {size} bytes exceeds max-record={self.max_record} "
                    f"and cannot be split; raise max-record or send smaller batches")
            yield wire.encoded_body(batch.page_numbers, batch.kinds, offsets, batch.payload, chain, raw_size)
            return
        costs = wire.ENCODED_ENTRY_SIZE + np.diff(offsets).astype(np.int64)
        budget = self.max_record - wire.encoded_body_size(0, 0, chain)
        for start, end in _split(costs, budget, self.factory_name):
            local = offsets[start:end + 1] - offsets[start]
            piece = batch.payload[int(offsets[start]):int(offsets[end])]
            yield wire.encoded_body(batch.page_numbers[start:end], batch.kinds[start:end], local, piece,
                                    chain, int(local[-1]))

    # ---- control batches ------------------------------------------------------
    def control(self, batch: Batch) -> Iterator[Batch]:
        parts: list = []
        if batch.flags & Flag.LAYOUT:
            extra = {k: v for k, v in batch.meta.items() if k != "regions"}
            self._layout = (batch, wire.layout_body(list(batch.meta.get("regions", [])), extra))
            if self._header is None:
                self._held.extend(self._record(RecordType.LAYOUT, *self._layout)[0])
            else:
                self._append(parts, RecordType.LAYOUT, *self._layout)
        if batch.flags & Flag.EPOCH_END:
            self._declare(batch, self.codec, parts)
            self._append(parts, RecordType.EPOCH_COMMIT, batch, wire.commit_body(self._commit(batch)))
        if batch.flags & Flag.END_OF_STREAM:
            self._declare(batch, self.codec, parts)
            if self._open_epoch is not None:
                raise ConfigError(f"{self.factory_name}: end of stream while epoch {self._open_epoch} is open")
            self._append(parts, RecordType.END_OF_STREAM, batch, [])
        if parts:
            yield self._stream_batch(batch, parts)
        yield batch.with_(format=STREAM)

    def _commit(self, marker: Batch) -> Commit:
        if self._open_epoch is not None and marker.epoch != self._open_epoch:
            raise ConfigError(f"{self.factory_name}: end of epoch {marker.epoch} while epoch {self._open_epoch} is open")
        announced = marker.meta.get("pages")
        if announced is not None and int(announced) != self._epoch_entries:
            self.context.warn(f"{self.factory_name}: epoch {marker.epoch} end says {announced} pages, "
                              f"{self._epoch_entries} were framed")
        meta = marker.meta
        digest = meta.get("digest")
        fits = isinstance(digest, (int, np.integer)) and 0 <= int(digest) < 1 << 64
        known = {"pages", "digest"} if fits else {"pages"}
        commit = Commit(pages=self._epoch_entries, records=len(self._epoch_checksums),
                        stream_digest=wire.stream_digest(self._epoch_checksums),
                        digest=int(digest) if fits else None,
                        time=meta.get("time"), pause_ms=meta.get("pause_ms"),
                        extra={k: v for k, v in meta.items() if k not in known | {"time", "pause_ms"}})
        self._open_epoch = None
        self._epoch_entries = 0
        self._epoch_checksums = []
        return commit

    # ---- helpers --------------------------------------------------------------
    def _declare(self, batch: Batch, chain: str, parts: list) -> None:
        """Write the stream header: at the start, and again to open a segment for each resync epoch.

        A segment (header, the current layout, then records numbered from 0) is
        self-contained, so a receiver that joins or restarts can start there.
        """
        if self._header is None:
            self._header = wire.StreamHeader(batch.page_size, self.max_record, batch.stream, chain)
            self._held.insert(0, wire.encode_stream_header(self._header))
            return
        if batch.page_size != self._header.page_size:
            raise ConfigError(f"{self.factory_name}: batch page size {batch.page_size} differs from the "
                              f"stream's {self._header.page_size}")
        if batch.flags & Flag.RESYNC and self._open_epoch is None:
            self._header = wire.StreamHeader(batch.page_size, self.max_record, batch.stream, chain or self._header.chain)
            self._sequence = 0
            parts.append(wire.encode_stream_header(self._header))
            if self._layout is not None:
                self._append(parts, RecordType.LAYOUT, *self._layout)
            self.counters["segments"] += 1

    def _enter_epoch(self, epoch: int) -> None:
        if self._open_epoch is None:
            self._open_epoch = epoch
        elif epoch != self._open_epoch:
            raise ConfigError(f"{self.factory_name}: batch of epoch {epoch} while epoch {self._open_epoch} is open")

    def _record(self, record_type: int, batch: Batch, body: list) -> tuple[list, int]:
        parts, checksum = wire.encode_record(record_type, _record_flags(batch.flags), batch.epoch, self._sequence, body)
        self._sequence += 1
        self.counters["records"] += 1
        return parts, checksum

    def _append(self, parts: list, record_type: int, batch: Batch, body: list) -> int:
        record_parts, checksum = self._record(record_type, batch, body)
        parts.extend(record_parts)
        return checksum

    def _stream_batch(self, batch: Batch, parts: list) -> Batch:
        if self._held:
            parts[:0] = self._held
            self._held = []
        payload = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self.counters["bytes_out"] += payload.nbytes
        return Batch(format=STREAM, epoch=batch.epoch, sequence=batch.sequence, flags=batch.flags & Flag.RESYNC,
                     stream=batch.stream, page_size=batch.page_size, payload=payload)


def _split(costs: np.ndarray, budget: int, stage: str) -> Iterator[tuple[int, int]]:
    """[start, end) entry ranges whose summed cost stays within budget."""
    if costs.size and int(costs.max()) > budget:
        raise ConfigError(f"{stage}: one page entry of {int(costs.max())} bytes exceeds the record limit")
    total = np.cumsum(costs)
    start, spent = 0, 0
    while start < len(costs):
        end = int(np.searchsorted(total, spent + budget, side="right"))
        yield start, end
        spent = int(total[end - 1])
        start = end


class Deframe(Stage):
    factory_name = "deframe"
    description = "Check and unframe the wire stream back into layout, page and epoch-end batches"
    input_caps = (STREAM,)
    output_caps = ANY
    max_workers = 1

    max_record = Property("size", "16MiB", "Records with a bigger body are refused as corrupt",
                          minimum=_MIN_RECORD_LIMIT, maximum=_MAX_RECORD_LIMIT)
    resume = Property("bool", False, "Join a running stream: drop input batches until one starts a segment "
                                     "(needs record-aligned batches, as zmq-src delivers)")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._reader = wire.RecordReader(self.max_record)
        self._known_chains: set[str] = set()
        self._layout: tuple[list, dict] | None = None
        self._starts = self._ends = None        # current layout, sorted page ranges
        self._open_epoch: int | None = None
        self._last_committed: int | None = None
        self._epoch_entries = 0
        self._epoch_checksums: list[int] = []
        self._ended = False
        self._waiting_for_segment = self.resume
        self._handlers = {RecordType.LAYOUT: self._on_layout, RecordType.PAGES: self._on_pages,
                          RecordType.ENCODED: self._on_encoded, RecordType.EPOCH_COMMIT: self._on_commit,
                          RecordType.END_OF_STREAM: self._on_end}
        self.counters.update(records=0, skipped_records=0, segments=0, bytes_in=0, skipped_bytes=0)

    def process(self, batch: Batch) -> Iterator[Batch]:
        if batch.payload is None:
            return
        if self._waiting_for_segment:
            if not wire.starts_segment(batch.payload):
                if not self.counters["skipped_bytes"]:
                    self.context.warn(f"{self.factory_name}: joined a running stream; skipping it until the "
                                      f"next segment (a resync epoch) begins")
                self.counters["skipped_bytes"] += batch.payload.nbytes
                return
            self._waiting_for_segment = False
        self.counters["bytes_in"] += batch.payload.nbytes
        for item in self._reader.feed(batch.payload):
            if isinstance(item, wire.StreamHeader):
                self._begin_segment(item)
            else:
                yield from self._on_record(item)

    def _begin_segment(self, header: wire.StreamHeader) -> None:
        """A stream header: the stream's first, or a sender starting afresh (a resync or a restart)."""
        where = {"offset": self._reader.offset, "epoch": self._open_epoch}
        if self._open_epoch is not None:
            raise wire.corrupt("a new stream segment starts inside an epoch (torn epoch)", **where)
        if self._ended:
            raise wire.corrupt("a new stream segment after the end-of-stream record", **where)
        self._check_chain(header.chain, None)
        self._last_committed = None         # a restarted sender may number its epochs afresh
        self.counters["segments"] += 1

    def control(self, batch: Batch) -> Iterator[Batch]:
        """Markers from the byte source: only end of stream matters (records carry the rest)."""
        yield from self.process(batch)
        if batch.flags & Flag.END_OF_STREAM and not self._ended:
            yield self._unexpected_end(batch)

    def _unexpected_end(self, batch: Batch) -> Batch:
        reader = self._reader
        if reader.header is None:
            raise wire.corrupt(f"stream ended inside its header ({reader.partial_bytes} bytes)", offset=0)
        if reader.partial_bytes:
            raise wire.corrupt(f"stream truncated inside a record ({reader.partial_bytes} bytes of it)",
                               offset=reader.offset, sequence=reader.next_sequence, epoch=self._open_epoch)
        if self._open_epoch is not None:
            raise wire.corrupt("stream ended inside an epoch (torn epoch)", offset=reader.offset,
                               epoch=self._open_epoch)
        self.context.warn(f"{self.factory_name}: stream ended without its end-of-stream record, "
                          f"after epoch {self._last_committed}")
        self._ended = True
        return self._control(Flag.END_OF_STREAM, self._last_committed or 0, self._reader.next_sequence, {})

    # ---- records --------------------------------------------------------------
    def _on_record(self, record: Record) -> Iterator[Batch]:
        self.counters["records"] += 1
        if self._ended:
            raise record.error("record after the end-of-stream record")
        if record.type & wire.OPTIONAL_RECORD and record.type not in RecordType._value2member_map_:
            self.counters["skipped_records"] += 1
            return
        batch = self._handlers[record.type](record)
        if batch is not None:
            yield batch

    def _on_layout(self, record: Record) -> Batch | None:
        """The new layout; None when a segment merely repeats the current one."""
        regions, extra = wire.parse_layout(record)
        if (regions, extra) == self._layout:
            return None
        self._layout = (regions, extra)
        ordered = sorted(regions, key=lambda region: region["first_page"])
        self._starts = np.array([r["first_page"] for r in ordered], dtype=np.uint64)
        self._ends = np.array([r["first_page"] + r["npages"] for r in ordered], dtype=np.uint64)
        return self._control(Flag.LAYOUT | _batch_flags(record), record.epoch, record.sequence,
                             {**extra, "regions": regions})

    def _on_pages(self, record: Record) -> Batch:
        page_numbers, kinds, data = wire.parse_pages(record, self._reader.header.page_size)
        self._admit(record, page_numbers)
        return self._data(record, PAGES, page_numbers, kinds, data=data)

    def _on_encoded(self, record: Record) -> Batch:
        pages = wire.parse_encoded(record, self._reader.header.page_size)
        self._check_chain(pages.chain, record)
        self._admit(record, pages.page_numbers)
        return self._data(record, ENCODED, pages.page_numbers, pages.kinds, payload=pages.payload,
                          offsets=pages.offsets, meta={"codec": pages.chain, "raw_size": pages.raw_size})

    def _on_commit(self, record: Record) -> Batch:
        commit = wire.parse_commit(record)
        self._check_epoch(record)
        expected = (self._epoch_entries, len(self._epoch_checksums), wire.stream_digest(self._epoch_checksums))
        found = (commit.pages, commit.records, commit.stream_digest)
        if found != expected:
            raise record.error(f"epoch commit does not match the epoch's records: commit says "
                               f"{commit.pages} pages in {commit.records} records (stream digest "
                               f"{commit.stream_digest:#x}), received {expected[0]} pages in {expected[1]} "
                               f"records ({expected[2]:#x})")
        meta: dict[str, Any] = dict(commit.extra)
        meta["pages"] = commit.pages
        for key in ("digest", "time", "pause_ms"):
            if getattr(commit, key) is not None:
                meta[key] = getattr(commit, key)
        self._open_epoch = None
        self._last_committed = record.epoch
        self._epoch_entries = 0
        self._epoch_checksums = []
        return self._control(Flag.EPOCH_END | _batch_flags(record), record.epoch, record.sequence, meta)

    def _on_end(self, record: Record) -> Batch:
        wire.parse_end_of_stream(record)
        if self._open_epoch is not None:
            raise record.error(f"end of stream inside epoch {self._open_epoch} (torn epoch)")
        self._ended = True
        return self._control(Flag.END_OF_STREAM, record.epoch, record.sequence, {})

    # ---- checks ---------------------------------------------------------------
    def _check_epoch(self, record: Record) -> None:
        """A record belongs to the open epoch, or opens the next one."""
        if self._open_epoch is None:
            if self._last_committed is not None and record.epoch <= self._last_committed:
                raise record.error(f"epoch {record.epoch} after epoch {self._last_committed} was committed")
            self._open_epoch = record.epoch
        elif record.epoch != self._open_epoch:
            raise record.error(f"record of epoch {record.epoch} inside open epoch {self._open_epoch}")

    def _admit(self, record: Record, page_numbers: np.ndarray) -> None:
        """Epoch order and layout bounds for a page record, then count it into its epoch."""
        self._check_epoch(record)
        if self._starts is None:
            raise record.error("page record before any layout record")
        if page_numbers.size:
            region = np.searchsorted(self._starts, page_numbers, side="right").astype(np.int64) - 1
            inside = (region >= 0) & (page_numbers < self._ends[np.maximum(region, 0)])
            if not inside.all():
                index = int(np.argmin(inside))
                raise record.error(f"page entry {index}: page number {int(page_numbers[index])} "
                                   f"is outside the layout")
        self._epoch_entries += int(page_numbers.size)
        self._epoch_checksums.append(record.checksum)

    def _check_chain(self, chain: str, record: Record | None) -> None:
        """Refuse a codec chain this receiver cannot decode."""
        if not chain or chain in self._known_chains:
            return
        from .codecs import EntropyCodec, get_codec
        where = {"offset": record.offset, "sequence": record.sequence} if record else {"offset": 0}
        try:
            codec = get_codec(chain)
        except (PagepipeError, KeyError, ValueError) as exc:
            raise wire.corrupt(f"codec chain {chain!r} is not known to this receiver ({exc})", **where) from None
        if isinstance(codec, EntropyCodec):
            raise wire.corrupt(f"codec chain {chain!r} has no page format to decode pages with", **where)
        self._known_chains.add(chain)

    # ---- output ---------------------------------------------------------------
    def _header_fields(self) -> dict[str, int]:
        header = self._reader.header
        return {"page_size": header.page_size, "stream": header.stream}

    def _control(self, flags: Flag, epoch: int, sequence: int, meta: dict[str, Any]) -> Batch:
        return Batch(flags=flags, epoch=epoch, sequence=sequence, meta=meta, **self._header_fields())

    def _data(self, record: Record, fmt: str, page_numbers: np.ndarray, kinds: np.ndarray, *,
              meta: dict | None = None, **arrays: np.ndarray) -> Batch:
        return Batch(format=fmt, epoch=record.epoch, sequence=record.sequence, flags=_batch_flags(record),
                     page_numbers=page_numbers, kinds=kinds, meta=meta or {}, **self._header_fields(), **arrays)


def deframe_stream(chunks: Iterable, max_record: int = wire.DEFAULT_RECORD_LIMIT,
                   context: StageContext | None = None) -> Iterator[Batch]:
    """Every batch a whole stream (an iterable of byte chunks) deframes to, checked, ending at end of stream."""
    stage = Deframe(max_record=max_record)
    stage.start(context or StageContext(stage_name=Deframe.factory_name))
    try:
        for chunk in chunks:
            yield from stage.handle(Batch(format=STREAM, payload=np.frombuffer(chunk, dtype=np.uint8)))
        yield from stage.handle(Batch.control(Flag.END_OF_STREAM, 0, format=STREAM))
    finally:
        stage.stop()
