"""`frame` and `deframe`: page batches to the wire stream and back (docs/FORMAT.md, wire-stream).

frame writes the stream header with its first output, one or more records
per page batch (split at the record limit), a layout record per LAYOUT, an
epoch-commit record per EPOCH_END and an end-of-stream record. deframe checks
everything structural (via ``stages.common.wire``) plus what needs stream state:
epochs open and close in order, page numbers fall inside the current layout,
codec chains are known here, each commit matches the records the epoch
actually had and (version 2) the layout in force. It does not decode page contents.

Stream identity (version 2, docs/FORMAT.md "Stream identity"): frame gives its
stream a random 128-bit identity (``stream-id=`` to choose it), kept by every
segment. deframe follows one identity: segments of it continue the epoch
order (their segment numbers must grow), and a segment of another identity is
refused unless ``resume=true``, where it starts a new epoch order and the
replica-sink decides whether to commit it. Every control batch deframe emits
carries the identity as ``meta["stream_id"]`` (32 hex digits), which the
replica-sink puts into its acknowledgements.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.batch import ANY, DEFAULT_PAGE_SIZE, ENCODED, PAGES, STREAM, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData, PagepipeError
from pipeline.stage import Property, Stage, StageContext

from .codecs import is_entropy_coded
from .common import wire
from .common.channels import MAX_CHANNELS
from .common.checks import array_of, check_encoded_batch
from .common.wire import Commit, Record, RecordFlag, RecordType

COALESCE_BYTES = 1 << 20
"""frame holds an epoch's records until its commit, or until this many bytes wait: one message per small epoch."""
_MIN_RECORD_LIMIT = 64 << 10
_MAX_RECORD_LIMIT = 1 << 30


_WHOLE_PAGE_KIND = np.zeros(256, dtype=np.uint8)     # kind in a PAGES record -> its whole-page encoding kind
_WHOLE_PAGE_KIND[[PageKind.NORMAL, PageKind.FULL]] = PageKind.FULL
_WHOLE_PAGE_KIND[PageKind.RAW] = PageKind.RAW
_WHOLE_PAGE_KIND[PageKind.ZERO] = PageKind.ZERO


def _record_flags(flags: Flag) -> int:
    return int(RecordFlag.RESYNC) if flags & Flag.RESYNC else 0


def _batch_flags(record: Record) -> Flag:
    return Flag.RESYNC if record.flags & RecordFlag.RESYNC else Flag.NONE


class Frame(Stage):
    factory_name = "frame"
    description = "Frame page batches as the versioned, checksummed wire stream with epoch commits"
    input_caps = (PAGES, ENCODED)
    output_caps = STREAM
    max_workers = MAX_CHANNELS
    in_lanes = False
    """Set by the fused frame+zmq-sink: with workers=N each worker frames one lane (docs/FORMAT.md, "Lanes")."""
    lane_identity = ""
    """Set by the fused frame+zmq-sink of N workers: the identity all lanes share when no batch names one."""

    max_record = Property("size", "16MiB", "Largest record body written; bigger page batches are split",
                          minimum=_MIN_RECORD_LIMIT, maximum=_MAX_RECORD_LIMIT)
    codec = Property("str", "", "Codec chain declared in the stream header (default: the first page batch's)")
    heartbeat = Property("duration", "100ms", "Write a heartbeat record after this long without output, so the "
                         "receiver can tell a quiet sender from a dead one (0 = never)", minimum=0)
    stream_id = Property("str", "", "Stream identity, 32 hex digits ('' = meta['stream_id'] of the first batch "
                         "that has one, else a fresh random one)")
    version = Property("int", wire.VERSION, "Wire format version written (1 for receivers older than version 2)",
                       minimum=1, maximum=wire.VERSION)

    def fuse(self, downstream: Stage) -> Stage | None:
        """With workers=N before a built-in zmq-sink channels=N, run both as one stage
        (``stages.transport.FrameZmqSink``): each worker frames and sends one lane.

        One worker is not fused: the wire stream between them is what the per-epoch statistics (wire bytes,
        ratio) and the logs name by element."""
        from .transport import FrameZmqSink, ZmqSink
        if type(self) is not Frame or type(downstream) is not ZmqSink or self.workers == 1:
            return None
        if downstream.workers not in (1, self.workers) or downstream.channels != self.workers:
            return None
        return FrameZmqSink.around(self, downstream)

    def start(self, context: StageContext) -> None:
        super().start(context)
        if context.worker_count > 1 and not self.in_lanes:
            raise ConfigError(f"{self.factory_name}: workers={context.worker_count} frames one lane per worker: "
                              f"link zmq-sink channels={context.worker_count} right after it (they run as one "
                              f"stage, each worker sending its lane on its own channel)")
        self.tick_interval = self.heartbeat / 2
        self._last_output = time.monotonic()
        self._ended = False
        self._header: wire.StreamHeader | None = None
        self._held: list = []               # record parts written before the header could be
        self._pending: list[bytes] = []     # the open epoch's records not yet sent (see _output)
        self._pending_bytes = 0
        self._layout: tuple[Batch, list] | None = None      # the last LAYOUT and its record body
        self._layout_digest = 0
        self._segment = 0
        self._identity = wire.parse_stream_id(self.stream_id) if self.stream_id else None
        self._sequence = 0
        self._open_epoch: int | None = None
        self._last_epoch = 0                # the last epoch committed (heartbeats carry it)
        self._epoch_entries = 0
        self._epoch_checksums: list[int] = []
        self.counters.update(records=0, segments=1, bytes_out=0, heartbeats=0)

    def tick(self) -> Iterator[Batch]:
        """A heartbeat record once nothing was written for ``heartbeat`` (after the stream header, before its end)."""
        if self._header is None or self._held or self._ended \
                or time.monotonic() - self._last_output < self.heartbeat:
            return
        marker = Batch.control(Flag.NONE, self._last_epoch, format=STREAM, stream=self._header.stream,
                               page_size=self._header.page_size)
        parts: list = []
        self._append(parts, RecordType.HEARTBEAT, marker,
                     wire.heartbeat_body(wire.Heartbeat(time.time(), round(self.heartbeat * 1000))))
        self.counters["heartbeats"] += 1
        yield from self._output(marker, parts, flush=True)

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
        yield from self._output(batch, parts, flush=False)

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
        offsets = np.asarray(array_of(batch, "offsets", self.factory_name), dtype=np.uint64)
        payload = array_of(batch, "payload", self.factory_name)
        raw_size = int(batch.meta.get("raw_size", int(offsets[-1])))
        if raw_size != int(offsets[-1]):
            raise CorruptData(f"{self.factory_name}: encoded batch of epoch {batch.epoch} has raw_size {raw_size} "
                              f"but its offsets end at {int(offsets[-1])}")
        if is_entropy_coded(chain):        # one entropy frame over the whole batch: it cannot be cut
            size = wire.encoded_body_size(batch.npages, len(payload), chain)
            if size > self.max_record:
                raise ConfigError(
                    f"{self.factory_name}: a {chain!r} batch of {size} bytes exceeds max-record={self.max_record} "
                    f"and cannot be split; raise max-record or send smaller batches")
            yield wire.encoded_body(batch.page_numbers, batch.kinds, offsets, payload, chain, raw_size)
            return
        costs = wire.ENCODED_ENTRY_SIZE + np.diff(offsets).astype(np.int64)
        budget = self.max_record - wire.encoded_body_size(0, 0, chain)
        for start, end in _split(costs, budget, self.factory_name):
            local = offsets[start:end + 1] - offsets[start]
            piece = payload[int(offsets[start]):int(offsets[end])]
            yield wire.encoded_body(batch.page_numbers[start:end], batch.kinds[start:end], local, piece,
                                    chain, int(local[-1]))

    # ---- control batches ------------------------------------------------------
    def control(self, batch: Batch) -> Iterator[Batch]:
        parts: list = []
        if batch.flags & Flag.LAYOUT:
            extra = {k: v for k, v in batch.meta.items() if k not in ("regions", "stream_id")}
            self._layout = (batch, wire.layout_body(list(batch.meta.get("regions", [])), extra))
            self._layout_digest = wire.layout_digest(self._layout[1])
            if self._header is None:
                self._held.extend(self._record(RecordType.LAYOUT, *self._layout)[0])
            else:
                self._append(parts, RecordType.LAYOUT, *self._layout)
        if batch.flags & Flag.EPOCH_END:
            self._declare(batch, self.codec, parts)
            self._append(parts, RecordType.EPOCH_COMMIT, batch, wire.commit_body(self._commit(batch), self.version))
        if batch.flags & Flag.END_OF_STREAM:
            self._declare(batch, self.codec, parts)
            if self._open_epoch is not None:
                raise ConfigError(f"{self.factory_name}: end of stream while epoch {self._open_epoch} is open")
            self._append(parts, RecordType.END_OF_STREAM, batch, [])
            self._ended = True
        if parts or self._pending:
            yield from self._output(batch, parts, flush=True)
        yield batch.with_(format=STREAM)

    def _commit(self, marker: Batch) -> Commit:
        if self._open_epoch is not None and marker.epoch != self._open_epoch:
            raise ConfigError(f"{self.factory_name}: end of epoch {marker.epoch} while epoch {self._open_epoch} is open")
        announced = marker.meta.get("pages")      # a lane frames its share: the epoch's count is the lanes' sum
        if announced is not None and int(announced) != self._epoch_entries and self.context.worker_count == 1:
            self.context.warn(f"{self.factory_name}: epoch {marker.epoch} end says {announced} pages, "
                              f"{self._epoch_entries} were framed")
        meta = marker.meta
        given = meta.get("digest")
        digest = int(given) if isinstance(given, (int, np.integer)) and 0 <= int(given) < 1 << 64 else None
        known = {"pages", "digest"} if digest is not None else {"pages"}
        commit = Commit(pages=self._epoch_entries, records=len(self._epoch_checksums),
                        stream_digest=wire.stream_digest(self._epoch_checksums),
                        digest=digest,
                        time=meta.get("time"), pause_ms=meta.get("pause_ms"),
                        extra={k: v for k, v in meta.items() if k not in known | {"time", "pause_ms", "stream_id"}},
                        layout_digest=self._layout_digest)
        self._open_epoch = None
        self._epoch_entries = 0
        self._epoch_checksums = []
        self._last_epoch = marker.epoch
        return commit

    # ---- helpers --------------------------------------------------------------
    def _declare(self, batch: Batch, chain: str, parts: list) -> None:
        """Write the stream header: at the start, and again to open a segment for each resync epoch.

        A segment (header, the current layout, then records numbered from 0) is
        self-contained, so a receiver that joins or restarts can start there.
        """
        if self._header is None:
            self._header = self._stream_header(batch, chain)
            self._held.insert(0, wire.encode_stream_header(self._header))
            return
        if batch.page_size != self._header.page_size:
            raise ConfigError(f"{self.factory_name}: batch page size {batch.page_size} differs from the "
                              f"stream's {self._header.page_size}")
        if batch.flags & Flag.RESYNC and self._open_epoch is None:
            self._segment += 1
            self._header = self._stream_header(batch, chain or self._header.chain)
            self._sequence = 0
            parts.append(wire.encode_stream_header(self._header))
            if self._layout is not None:
                self._append(parts, RecordType.LAYOUT, *self._layout)
            self.counters["segments"] += 1

    def _stream_header(self, batch: Batch, chain: str) -> wire.StreamHeader:
        if self.version == 1:
            return wire.StreamHeader(batch.page_size, self.max_record, wire._U32.pack(batch.stream), chain, 0, 1)
        identity = self._chosen_identity(batch)
        return wire.StreamHeader(batch.page_size, self.max_record, identity, chain, self._segment, self.version)

    def _settle_identity(self, batch: Batch) -> int:
        """Choose the identity at the first record (the header may come later) and return the checksum seed."""
        return int.from_bytes(self._chosen_identity(batch)[:8], "little")

    def _chosen_identity(self, batch: Batch) -> bytes:
        """The stream identity: the configured one, the first batch's meta["stream_id"], or a new one."""
        if self._identity is None:
            chosen = batch.meta.get("stream_id")
            try:
                self._identity = wire.parse_stream_id(chosen) if isinstance(chosen, str) else \
                    wire.parse_stream_id(self.lane_identity) if self.lane_identity else wire.new_stream_id()
            except ValueError as exc:
                raise ConfigError(f"{self.factory_name}: meta['stream_id']: {exc}") from None
        return self._identity

    @property
    def identity(self) -> str | None:
        """This stream's identity (32 hex digits) once its header is written; None before or in version 1."""
        return self._header.stream_hex if self._header is not None else None

    def _enter_epoch(self, epoch: int) -> None:
        if self._open_epoch is None:
            self._open_epoch = epoch
        elif epoch != self._open_epoch:
            raise ConfigError(f"{self.factory_name}: batch of epoch {epoch} while epoch {self._open_epoch} is open")

    def _record(self, record_type: int, batch: Batch, body: list) -> tuple[list, int]:
        seed = self._settle_identity(batch) if self.version >= 2 else 0
        parts, checksum = wire.encode_record(record_type, _record_flags(batch.flags), batch.epoch, self._sequence,
                                             body, seed)
        self._sequence += 1
        self.counters["records"] += 1
        return parts, checksum

    def _append(self, parts: list, record_type: int, batch: Batch, body: list) -> int:
        record_parts, checksum = self._record(record_type, batch, body)
        parts.extend(record_parts)
        return checksum

    def _output(self, batch: Batch, parts: list, flush: bool) -> Iterator[Batch]:
        """The stream bytes of ``parts`` as STREAM batches: an epoch's page records wait (up to COALESCE_BYTES)
        and leave with its commit, so an epoch of small batches is one message for the transport and deframe.
        ``flush`` sends everything waiting (control records, heartbeats)."""
        if self._held:
            parts[:0] = self._held
            self._held = []
        chunk = b"".join(parts) if parts else b""
        if self._pending and (flush or len(chunk) >= COALESCE_BYTES or
                              self._pending_bytes + len(chunk) > COALESCE_BYTES):
            if len(chunk) < COALESCE_BYTES:     # small: it joins the waiting bytes
                self._pending.append(chunk)
                self._pending_bytes += len(chunk)
                chunk = b""
            yield self._stream_batch(batch, b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0
        if not chunk:
            return
        if flush or len(chunk) >= COALESCE_BYTES:
            yield self._stream_batch(batch, chunk)
        else:
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)

    def _stream_batch(self, batch: Batch, data: bytes) -> Batch:
        payload = np.frombuffer(data, dtype=np.uint8)
        self.counters["bytes_out"] += payload.nbytes
        self._last_output = time.monotonic()
        stream = self._header.stream if self._header is not None else batch.stream
        return Batch(format=STREAM, epoch=batch.epoch, sequence=batch.sequence, flags=batch.flags & Flag.RESYNC,
                     stream=stream, page_size=batch.page_size, payload=payload)


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
                                     "(needs record-aligned batches, as zmq-src delivers), and take a segment of "
                                     "another stream identity (a restarted sender) as a new epoch order")

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._reader = wire.RecordReader(self.max_record)
        self._known_chains: set[str] = set()
        self._layout: tuple[list, dict] | None = None
        self._layout_digest = 0                 # of the last LAYOUT record's body (v2 commits name it)
        self._identity: bytes | None = None     # the stream followed (v2)
        self._segment = 0
        self._starts: np.ndarray | None = None   # current layout, sorted page ranges
        self._ends: np.ndarray | None = None
        self._open_epoch: int | None = None
        self._last_committed: int | None = None
        self._epoch_entries = 0
        self._epoch_checksums: list[int] = []
        self._ended = False
        self._waiting_for_segment = self.resume
        self._handlers: dict[int, Callable[[Record], Batch | list[Batch] | None]] = {
                          RecordType.LAYOUT: self._on_layout, RecordType.PAGES: self._on_pages,
                          RecordType.ENCODED: self._on_encoded, RecordType.EPOCH_COMMIT: self._on_commit,
                          RecordType.END_OF_STREAM: self._on_end, RecordType.HEARTBEAT: self._on_heartbeat}
        self.counters.update(records=0, skipped_records=0, segments=0, streams=0, bytes_in=0, skipped_bytes=0,
                             heartbeats=0)

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
        where = {"offset": self._reader.segment_offset, "epoch": self._open_epoch}
        if self._open_epoch is not None:
            raise wire.corrupt("a new stream segment starts inside an epoch (torn epoch)", **where)
        if self._ended:
            raise wire.corrupt("a new stream segment after the end-of-stream record", **where)
        self._check_chain(header.chain, None, where["offset"])
        if header.version == 1 or header.stream_id != self._identity:
            self._new_stream(header, where)
        elif header.segment <= self._segment:
            raise wire.corrupt(f"stale segment {header.segment} of this stream after segment {self._segment}", **where)
        self._segment = header.segment
        self.counters["segments"] += 1

    def _new_stream(self, header: wire.StreamHeader, where: dict) -> None:
        """A segment of another stream: the first, a v1 segment, or (resume=true) a restarted sender's.

        It starts a new epoch order; whether its epochs may replace the replica is the
        replica-sink's decision (it follows one identity, see stages.replica).
        """
        if self._identity is not None and header.version >= 2:
            if not self.resume:
                raise wire.corrupt(f"a segment of another stream ({header.stream_hex}) inside stream "
                                   f"{self._identity.hex()} (resume=false)", **where)
            self.context.warn(f"{self.factory_name}: stream {self._identity.hex()} replaced by stream "
                              f"{header.stream_hex} at byte offset {where['offset']}")
        self._identity = header.stream_id
        self._last_committed = None         # a restarted sender numbers its epochs afresh
        self.counters["streams"] += 1

    def control(self, batch: Batch) -> Iterator[Batch]:
        """Markers from the byte source: end of stream, and the sender's loss (records carry the rest)."""
        yield from self.process(batch)
        if batch.flags & Flag.SENDER_LOST:
            yield self._sender_lost(batch)
        if batch.flags & Flag.END_OF_STREAM and not self._ended:
            yield self._unexpected_end(batch)

    def _sender_lost(self, batch: Batch) -> Batch:
        """The source declared the sender gone: an open epoch is torn for good, and whatever the sender (or a
        new one) sends later starts over at a stream segment."""
        header = self._reader.header
        lost = Batch.control(Flag.SENDER_LOST, self._last_committed or 0, format=ANY,
                             page_size=header.page_size if header else DEFAULT_PAGE_SIZE,
                             stream=header.stream if header else 0, **{**batch.meta, "open_epoch": self._open_epoch})
        self._reader = wire.RecordReader(self.max_record)
        self._open_epoch = None
        self._epoch_entries = 0
        self._epoch_checksums = []
        self._identity = None               # a sender that comes back, or a new one, starts a stream afresh
        self._waiting_for_segment = True
        return lost

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
        if isinstance(batch, list):
            yield from batch
        elif batch is not None:
            yield from _in_parts(batch)

    def _on_layout(self, record: Record) -> Batch | None:
        """The new layout; None when a segment merely repeats the current one."""
        regions, extra = wire.parse_layout(record, self._in_header.page_size)
        self._layout_digest = wire.layout_digest(record.body)
        if (regions, extra) == self._layout:
            return None
        self._layout = (regions, extra)
        ordered = sorted(regions, key=lambda region: region["first_page"])
        self._starts = np.array([r["first_page"] for r in ordered], dtype=np.uint64)
        self._ends = np.array([r["first_page"] + r["npages"] for r in ordered], dtype=np.uint64)
        return self._control(Flag.LAYOUT | _batch_flags(record), record.epoch, record.sequence,
                             {**extra, "regions": regions})

    def _on_pages(self, record: Record) -> Batch | list[Batch]:
        """Whole pages. ZERO entries are expanded into zero pages only while they cost no more memory
        than the record's own bytes; a record of more becomes a ``native`` whole-page encoding (FULL,
        RAW and ZERO entries, NORMAL sent as FULL), so memory stays within twice what was received."""
        page_size = self._in_header.page_size
        page_numbers, kinds, rows = wire.parse_pages(record, page_size)
        self._admit(record, page_numbers)
        if (kinds.shape[0] - rows.shape[0]) * page_size <= len(record.body):
            return self._data(record, PAGES, page_numbers, kinds, data=wire.expand_pages(kinds, rows))
        whole = _WHOLE_PAGE_KIND[kinds]
        if (whole == 0).any():
            index = int(np.argmin(whole))
            raise record.error(f"page entry {index}: kind {int(kinds[index])} is not a whole page")
        parts, row = [], 0
        for first in range(0, kinds.shape[0], MAX_BATCH_ENTRIES):   # made part by part: no array of all entries
            part = whole[first:first + MAX_BATCH_ENTRIES]
            offsets = np.zeros(part.shape[0] + 1, dtype=np.uint64)
            np.cumsum(part != PageKind.ZERO, dtype=np.uint64, out=offsets[1:])
            stored = int(offsets[-1])
            offsets *= np.uint64(page_size)
            payload = rows[row:row + stored].reshape(-1)
            row += stored
            parts.append(self._data(record, ENCODED, page_numbers[first:first + part.shape[0]], part,
                                    payload=payload, offsets=offsets,
                                    meta={"codec": "native", "raw_size": int(payload.shape[0])}))
        return parts

    def _on_encoded(self, record: Record) -> Batch:
        pages = wire.parse_encoded(record, self._in_header.page_size)
        self._check_chain(pages.chain, record)
        self._admit(record, pages.page_numbers)
        return self._data(record, ENCODED, pages.page_numbers, pages.kinds, payload=pages.payload,
                          offsets=pages.offsets, meta={"codec": pages.chain, "raw_size": pages.raw_size})

    def _on_commit(self, record: Record) -> Batch:
        commit = wire.parse_commit(record, self._in_header.version)
        self._check_epoch(record)
        if commit.layout_digest is not None and commit.layout_digest != self._layout_digest:
            raise record.error(f"epoch commit names layout digest {commit.layout_digest:#x}, the layout in force "
                               f"is {self._layout_digest:#x} (a layout record was altered or lost)")
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

    def _on_heartbeat(self, record: Record) -> None:
        wire.parse_heartbeat(record)
        self.counters["heartbeats"] += 1

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
        if self._starts is None or self._ends is None:
            raise record.error("page record before any layout record")
        starts, ends = self._starts, self._ends
        checked = page_numbers.size
        if checked:             # lowest and highest in one region: every number between is inside it
            low, high = int(page_numbers.min()), int(page_numbers.max())
            first_region = int(np.searchsorted(starts, low, side="right")) - 1
            if first_region >= 0 and high < int(ends[first_region]):
                checked = 0
        for first in range(0, checked, MAX_BATCH_ENTRIES):     # else entry by entry, in slices: bounded temporaries
            numbers = page_numbers[first:first + MAX_BATCH_ENTRIES]
            region = np.searchsorted(starts, numbers, side="right").astype(np.int64) - 1
            inside = (region >= 0) & (numbers < ends[np.maximum(region, 0)])
            if not inside.all():
                index = first + int(np.argmin(inside))
                raise record.error(f"page entry {index}: page number {int(page_numbers[index])} "
                                   f"is outside the layout")
        self._epoch_entries += int(page_numbers.size)
        self._epoch_checksums.append(record.checksum)

    def _check_chain(self, chain: str, record: Record | None, header_offset: int | None = 0) -> None:
        """Refuse a codec chain this receiver cannot decode."""
        if not chain or chain in self._known_chains:
            return
        from .codecs import EntropyCodec, get_codec
        where = {"offset": record.offset, "sequence": record.sequence} if record else {"offset": header_offset}
        try:
            codec = get_codec(chain)
        except (PagepipeError, KeyError, ValueError) as exc:
            raise wire.corrupt(f"codec chain {chain!r} is not known to this receiver ({exc})", **where) from None
        if isinstance(codec, EntropyCodec):
            raise wire.corrupt(f"codec chain {chain!r} has no page format to decode pages with", **where)
        self._known_chains.add(chain)

    # ---- output ---------------------------------------------------------------
    @property
    def _in_header(self) -> wire.StreamHeader:
        """The header of the stream being read; CorruptData before it has been read."""
        header = self._reader.header
        if header is None:
            raise wire.corrupt("record before the stream header", offset=0)
        return header

    def _control(self, flags: Flag, epoch: int, sequence: int, meta: dict[str, Any]) -> Batch:
        header = self._in_header
        if header.stream_hex is not None:
            meta = {**meta, "stream_id": header.stream_hex}
        return Batch(flags=flags, epoch=epoch, sequence=sequence, meta=meta, page_size=header.page_size,
                     stream=header.stream)

    def _data(self, record: Record, fmt: str, page_numbers: np.ndarray, kinds: np.ndarray, *,
              meta: dict | None = None, data: np.ndarray | None = None, payload: np.ndarray | None = None,
              offsets: np.ndarray | None = None) -> Batch:
        header = self._in_header
        return Batch(format=fmt, epoch=record.epoch, sequence=record.sequence, flags=_batch_flags(record),
                     page_size=header.page_size, stream=header.stream, page_numbers=page_numbers, kinds=kinds,
                     data=data, payload=payload, offsets=offsets, meta=meta or {})


MAX_BATCH_ENTRIES = 1 << 16
"""Page entries per batch deframe emits: a record of more (such as 16 MiB of ZERO entries) is cut into
batches of views, so that no stage downstream makes arrays of millions of entries at once. A record whose
payload is one entropy frame cannot be cut."""


def _in_parts(batch: Batch) -> Iterator[Batch]:
    """``batch``, cut into batches of at most MAX_BATCH_ENTRIES entries where it is a page batch that can be."""
    if batch.is_control or batch.npages <= MAX_BATCH_ENTRIES or is_entropy_coded(str(batch.meta.get("codec", ""))):
        yield batch
        return
    for start in range(0, batch.npages, MAX_BATCH_ENTRIES):
        end = min(start + MAX_BATCH_ENTRIES, batch.npages)
        part = batch.with_(page_numbers=batch.page_numbers[start:end], kinds=batch.kinds[start:end])
        if batch.format == PAGES:
            yield part.with_(data=array_of(batch, "data", "deframe")[start:end])
        else:
            offsets, payload = array_of(batch, "offsets", "deframe"), array_of(batch, "payload", "deframe")
            first, last = int(offsets[start]), int(offsets[end])
            yield part.with_(payload=payload[first:last], offsets=offsets[start:end + 1] - np.uint64(first),
                             meta={**batch.meta, "raw_size": last - first})


def deframe_stream(chunks: Iterable, max_record: int = wire.DEFAULT_RECORD_LIMIT,
                   context: StageContext | None = None, **properties: Any) -> Iterator[Batch]:
    """Every batch a whole stream (an iterable of byte chunks) deframes to, checked, ending at end of stream.

    ``properties``: other deframe properties (``resume=True``)."""
    stage = Deframe(max_record=max_record, **properties)
    stage.start(context or StageContext(stage_name=Deframe.factory_name))
    try:
        for chunk in chunks:
            yield from stage.handle(Batch(format=STREAM, payload=np.frombuffer(chunk, dtype=np.uint8)))
        yield from stage.handle(Batch.control(Flag.END_OF_STREAM, 0, format=STREAM))
    finally:
        stage.stop()
