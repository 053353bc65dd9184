"""The pagepipe wire stream, versions 2 (written) and 1 (read): the one module that knows its bytes.

A stream is a stream header followed by records. Every record is a 32-byte
header (type, flags, body length, epoch, sequence, xxh3-64 checksum) and a
body. docs/FORMAT.md (section wire-stream) specifies every field; this module
writes and parses them and checks everything a byte-level reader can check:
magic, version, lengths against the record limit, checksums, sequence
continuity, known record types, and the internal consistency of each body.
A stream header may recur at a record boundary to start a new segment.
Epoch bookkeeping and page-number bounds live in ``stages.framer``.

Version 2 gives every stream a random 128-bit identity (``StreamHeader.stream_id``)
that seeds every record checksum, numbers the segments of a stream, and puts the
digest of the layout in force into each epoch commit. The identity is what
acknowledgements name (``stream_id`` in the batches deframe emits).

Everything read is untrusted: parsers raise ``CorruptData`` naming the record
(sequence number) and its byte offset in the stream, and never read past a
checked length.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Iterator

import numpy as np
import xxhash

from pipeline.batch import PageKind
from pipeline.errors import CorruptData

from stages.codecs import is_entropy_coded

from .layout import Region, array_spec, check_regions
from .pages import check_page_size

MAGIC = b"PAGEPIPE"
VERSION = 2                                     # written; VERSIONS are read
VERSIONS = (1, 2)
STREAM_ID_BYTES = 16
MAX_HEADER_BYTES = 4096
MAX_CHAIN_BYTES = 64
MAX_EXTRA_BYTES = 1 << 16
MAX_REGIONS = 1 << 16
MAX_PAGE_NUMBER = 1 << 40
DEFAULT_RECORD_LIMIT = 16 << 20

_HEADER_V1 = struct.Struct("<8sHHIIIB")         # magic, version, header size, page size, record limit, stream, chain length
_HEADER_V2 = struct.Struct("<8sHHIII16sB")      # ... page size, record limit, segment, stream id, chain length
_HEADER_FIXED = {1: _HEADER_V1, 2: _HEADER_V2}
_RECORD_HEADER = struct.Struct("<HHIQQQ")       # type, flags, body length, epoch, sequence, checksum
RECORD_HEADER_SIZE = _RECORD_HEADER.size        # 32
_CHECKED_HEADER_BYTES = 24                      # the checksum covers header bytes [0, 24) and the body
_PAGES_HEAD = struct.Struct("<II")              # entries, entries carrying data
_ENCODED_HEAD = struct.Struct("<IB3xQQ")        # entries, chain length, raw size, payload length
PAGES_ENTRY_SIZE = 9                            # per entry of a PAGES body: page number, kind (+ its page)
ENCODED_ENTRY_SIZE = 13                         # per entry of an ENCODED body: page number, kind, length
_REGION = struct.Struct("<QQQH")                # start, first page, page count, name length
_COMMIT = struct.Struct("<QQQB7xQdd")           # pages, records, stream digest, has digest, digest, time, pause ms
_HEARTBEAT = struct.Struct("<dI4x")             # unix time sent, heartbeat interval in ms
_LAYOUT_DIGEST = struct.Struct("<Q")            # v2: after the commit's fixed fields
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RecordType(IntEnum):
    """Record types. Bit 0x8000 marks an optional record a reader may skip."""

    LAYOUT = 0x0001
    PAGES = 0x0002
    ENCODED = 0x0003
    EPOCH_COMMIT = 0x0004
    END_OF_STREAM = 0x0005
    HEARTBEAT = 0x8001      # optional: the sender is alive (a reader that does not know it skips it)


OPTIONAL_RECORD = 0x8000
RESERVED_RECORD_TYPES = {            # numbers kept for later record types (docs/FORMAT.md; HEARTBEAT, 0x8001, is read now)
    0x0006: "CHANNEL", 0x0007: "PROCESS",
}


class RecordFlag(IntFlag):
    NONE = 0
    RESYNC = 1


_KNOWN_FLAGS = int(RecordFlag.RESYNC)
_MAX_KIND = max(PageKind)
_WHOLE_PAGE_KINDS = (PageKind.FULL, PageKind.RAW)
_IS_WHOLE_PAGE = np.zeros(256, dtype=bool)       # kind -> whether its entry is one whole page
_IS_WHOLE_PAGE[list(_WHOLE_PAGE_KINDS)] = True


def corrupt(message: str, *, offset: int | None = None, sequence: int | None = None,
            epoch: int | None = None) -> CorruptData:
    """A CorruptData saying where: record sequence, byte offset, epoch (also as attributes)."""
    where = []
    if sequence is not None:
        where.append(f"record #{sequence}")
    if offset is not None:
        where.append(f"byte offset {offset}")
    if epoch is not None:
        where.append(f"epoch {epoch}")
    error = CorruptData(f"wire stream, {', '.join(where)}: {message}" if where else f"wire stream: {message}")
    error.offset, error.sequence, error.epoch = offset, sequence, epoch
    return error


# ---- stream header ------------------------------------------------------------

def new_stream_id() -> bytes:
    """A fresh random stream identity (128 bits from the OS's CSPRNG, never all zeros)."""
    while True:
        identity = os.urandom(STREAM_ID_BYTES)
        if any(identity):
            return identity


def parse_stream_id(text: str) -> bytes:
    """A stream identity from its 32 hex digits (as ``stream_id`` is written in batch meta and acks)."""
    try:
        identity = bytes.fromhex(text)
    except (TypeError, ValueError):
        identity = b""
    if len(identity) != STREAM_ID_BYTES or not any(identity):
        raise ValueError(f"stream id {text!r} is not {2 * STREAM_ID_BYTES} hex digits (not all zero)")
    return identity


@dataclass(frozen=True)
class StreamHeader:
    page_size: int
    record_limit: int
    stream_id: bytes    # v2: 16 random bytes; v1: the u32 stream field, 4 bytes little endian
    chain: str          # codec chain the stream declares; "" = pages travel whole
    segment: int = 0    # v2: 0 for the stream's first segment, +1 for each later one (v1: always 0)
    version: int = VERSION

    @property
    def stream(self) -> int:
        """The identity's first 32 bits (the runtime's ``Batch.stream``)."""
        return int.from_bytes(self.stream_id[:4], "little")

    @property
    def stream_hex(self) -> str | None:
        """The identity as 32 hex digits (v2), None for a version 1 stream (which has none)."""
        return self.stream_id.hex() if self.version >= 2 else None

    @property
    def checksum_seed(self) -> int:
        """Seed of every record checksum: v2 binds records to their stream's identity, v1 used 0."""
        return int.from_bytes(self.stream_id[:8], "little") if self.version >= 2 else 0


def encode_stream_header(header: StreamHeader) -> bytes:
    chain = _encode_chain(header.chain)
    layout = _HEADER_FIXED[header.version]
    fixed_size = layout.size + len(chain)
    size = -(-fixed_size // 8) * 8 + 8
    fields: tuple[int] | tuple[int, bytes]
    if header.version == 1:
        fields = (header.stream,)
    else:
        if len(header.stream_id) != STREAM_ID_BYTES or not any(header.stream_id):
            raise ValueError(f"stream id must be {STREAM_ID_BYTES} bytes, not all zero")
        fields = (header.segment, header.stream_id)
    head = layout.pack(MAGIC, header.version, size, header.page_size, header.record_limit, *fields, len(chain)) + chain
    head += bytes(size - 8 - len(head))
    return head + _U64.pack(xxhash.xxh3_64_intdigest(head))


def parse_stream_header(data: memoryview, base: int = 0) -> tuple[StreamHeader, int] | None:
    """(header, its size) from bytes starting with a header, or None if more bytes are needed.

    ``base`` is the header's offset in the stream: errors name stream offsets.
    """
    if len(data) < 12:
        if bytes(data[:len(MAGIC)]) != MAGIC[:len(data)]:
            raise corrupt("not a pagepipe stream (bad magic)", offset=base)
        return None
    magic, version, size = struct.unpack_from("<8sHH", data)
    if magic != MAGIC:
        raise corrupt(f"not a pagepipe stream (magic {magic!r})", offset=base)
    if version not in VERSIONS:
        raise corrupt(f"unsupported stream version {version} (this reader knows {', '.join(map(str, VERSIONS))})",
                      offset=base + 8)
    layout = _HEADER_FIXED[version]
    if not layout.size + 8 <= size <= MAX_HEADER_BYTES or size % 8:
        raise corrupt(f"stream header size {size} is invalid", offset=base + 10)
    if len(data) < size:
        return None
    stored = _U64.unpack_from(data, size - 8)[0]
    if xxhash.xxh3_64_intdigest(data[:size - 8]) != stored:
        raise corrupt("stream header checksum mismatch", offset=base + size - 8)
    if version == 1:
        _, _, _, page_size, record_limit, stream, chain_len = layout.unpack_from(data)
        stream_id, segment = _U32.pack(stream), 0
    else:
        _, _, _, page_size, record_limit, segment, stream_id, chain_len = layout.unpack_from(data)
        if not any(stream_id):
            raise corrupt("stream header: the stream id is all zeros", offset=base + 24)
    if layout.size + chain_len > size - 8:
        raise corrupt(f"stream header codec chain of {chain_len} bytes overruns the header",
                      offset=base + layout.size - 1)
    try:
        check_page_size(page_size)
    except ValueError as exc:
        raise corrupt(f"stream header: {exc}", offset=base + 12) from None
    chain = _decode_chain(data[layout.size:layout.size + chain_len], offset=base + layout.size)
    return StreamHeader(page_size, record_limit, stream_id, chain, segment, version), size


def _encode_chain(chain: str) -> bytes:
    raw = chain.encode("ascii")
    if len(raw) > MAX_CHAIN_BYTES:
        raise ValueError(f"codec chain {chain!r} is longer than {MAX_CHAIN_BYTES} bytes")
    return raw


def _decode_chain(raw: memoryview, *, offset: int, sequence: int | None = None) -> str:
    text = bytes(raw)
    if not all(0x21 <= c < 0x7F for c in text):
        raise corrupt(f"codec chain {text!r} is not printable ASCII", offset=offset, sequence=sequence)
    return text.decode("ascii")


# ---- records: writing -----------------------------------------------------------

def encode_record(record_type: int, flags: int, epoch: int, sequence: int, body: list,
                  seed: int = 0) -> tuple[list, int]:
    """The parts (header, then body buffers) of one record, and its checksum.

    ``body`` is a list of bytes-like parts, written back to back without copying here;
    ``seed`` is the stream's ``StreamHeader.checksum_seed``.
    """
    length = sum(memoryview(part).nbytes for part in body)
    head = struct.pack("<HHIQQ", record_type, flags, length, epoch, sequence)
    hasher = xxhash.xxh3_64(head, seed=seed)
    for part in body:
        hasher.update(part)
    checksum = hasher.intdigest()
    return [head + _U64.pack(checksum), *body], checksum


REGION_ARRAYS = "region_arrays"
"""Layout metadata key: {"<region index>": {"dtype": "<f8", "shape": [..]}} for regions holding numpy arrays."""


def layout_body(regions: list[dict], extra: dict[str, Any]) -> list:
    arrays = {str(index): {"dtype": region["dtype"], "shape": list(region.get("shape", ()))}
              for index, region in enumerate(regions) if region.get("dtype")}
    if arrays:
        extra = {**extra, REGION_ARRAYS: arrays}
    parts = [_U32.pack(len(regions)) + bytes(4)]
    for region in regions:
        name = str(region["name"]).encode("utf-8")
        if len(name) > 0xFFFF:
            raise ValueError(f"region name of {len(name)} bytes is too long")
        parts.append(_REGION.pack(int(region["start"]), int(region["first_page"]), int(region["npages"]), len(name)))
        parts.append(name)
    parts.append(_extra_bytes(extra))
    return parts


def pages_body_size(entries: int, pages_with_data: int, page_size: int) -> int:
    return _PAGES_HEAD.size + PAGES_ENTRY_SIZE * entries + pages_with_data * page_size


def encoded_body_size(entries: int, payload_len: int, chain: str) -> int:
    return _ENCODED_HEAD.size + len(chain) + ENCODED_ENTRY_SIZE * entries + payload_len


def pages_body(page_numbers: np.ndarray, kinds: np.ndarray, data: np.ndarray | None) -> list:
    """Whole pages: entries of kind ZERO carry no bytes, every other entry its page."""
    carries = kinds != PageKind.ZERO
    stored = int(np.count_nonzero(carries))
    parts = [_PAGES_HEAD.pack(len(page_numbers), stored),
             np.ascontiguousarray(page_numbers, dtype="<u8"), np.ascontiguousarray(kinds, dtype=np.uint8)]
    if stored:
        if data is None:
            raise ValueError(f"{stored} pages to store but no page data")
        rows = data if stored == len(kinds) else data[carries]
        parts.append(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1))
    return parts


def encoded_body(page_numbers: np.ndarray, kinds: np.ndarray, offsets: np.ndarray, payload: np.ndarray,
                 chain: str, raw_size: int) -> list:
    """Encoded pages: per-entry lengths index into the payload as it is before entropy coding."""
    chain_bytes = _encode_chain(chain)
    lengths = np.diff(np.asarray(offsets, dtype=np.uint64)).astype("<u4")
    return [_ENCODED_HEAD.pack(len(page_numbers), len(chain_bytes), raw_size, len(payload)) + chain_bytes,
            np.ascontiguousarray(page_numbers, dtype="<u8"), np.ascontiguousarray(kinds, dtype=np.uint8),
            lengths, np.ascontiguousarray(payload, dtype=np.uint8)]


@dataclass(frozen=True)
class Commit:
    """An epoch-commit record's body."""

    pages: int              # page entries the epoch's page records carried
    records: int            # page records the epoch had
    stream_digest: int      # xxh3-64 over the checksums of those records, in sequence order
    digest: int | None      # the tracker's order-independent content digest
    time: float | None      # unix time of the checkpoint
    pause_ms: float | None
    extra: dict[str, Any]   # other end-of-epoch meta, as JSON
    layout_digest: int | None = None    # v2: ``layout_digest`` of the layout in force (None in v1)


def commit_body(commit: Commit, version: int = VERSION) -> list:
    has_digest = commit.digest is not None
    body = _COMMIT.pack(commit.pages, commit.records, commit.stream_digest, int(has_digest),
                        commit.digest if has_digest else 0, _or_nan(commit.time), _or_nan(commit.pause_ms))
    if version >= 2:
        body += _LAYOUT_DIGEST.pack(commit.layout_digest or 0)
    return [body, _extra_bytes(commit.extra)]


def layout_digest(body) -> int:
    """The layout digest an epoch commit carries (v2): xxh3-64 (seed 0) of the LAYOUT record's body
    in force, or 0 when no layout was sent. ``body`` is bytes-like or a list of parts."""
    hasher = xxhash.xxh3_64()
    for part in (body if isinstance(body, list) else [body]):
        hasher.update(part)
    return hasher.intdigest()


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _extra_bytes(extra: dict[str, Any]) -> bytes:
    raw = json.dumps(extra, separators=(",", ":"), sort_keys=True, default=_json_scalar).encode() if extra else b""
    if len(raw) > MAX_EXTRA_BYTES:
        raise ValueError(f"record metadata of {len(raw)} bytes exceeds {MAX_EXTRA_BYTES}")
    return _U32.pack(len(raw)) + raw


def _json_scalar(value: Any) -> Any:
    """numpy scalars and arrays in metadata become plain JSON values."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"record metadata value {value!r} of type {type(value).__name__} is not JSON-serializable")


def stream_digest(checksums: list[int]) -> int:
    """The epoch's stream digest: xxh3-64 over its page records' checksums (u64 little endian)."""
    return xxhash.xxh3_64_intdigest(np.asarray(checksums, dtype="<u8").tobytes())


# ---- records: reading -----------------------------------------------------------

@dataclass(frozen=True)
class Record:
    type: int
    flags: RecordFlag
    epoch: int
    sequence: int
    checksum: int
    offset: int             # byte offset of the record header in the stream
    body: memoryview

    def error(self, message: str) -> CorruptData:
        return corrupt(message, offset=self.offset, sequence=self.sequence, epoch=self.epoch)


def starts_segment(data) -> bool:
    """Whether bytes at a record boundary begin a stream header (no record type can start so)."""
    head = bytes(data[:len(MAGIC)])
    return head == MAGIC[:len(head)]


class RecordReader:
    """Splits a byte stream, fed in chunks of any size, into checked records.

    Whole records inside one chunk are returned as views of it (no copy);
    only a record that straddles chunks is reassembled, with one copy. Chunks
    are referenced until used, so they must not change after being fed. A
    stream header may recur at a record boundary: it starts a new *segment*
    (sequence from 0).
    """

    def __init__(self, record_limit: int = DEFAULT_RECORD_LIMIT):
        self.record_limit = record_limit
        self.segment_offset = 0         # stream offset of the current segment's header
        self.header: StreamHeader | None = None
        self.offset = 0                 # stream offset of the first unconsumed byte
        self.next_sequence = 0
        self._pending: list[memoryview] = []    # an incomplete header or record, chunk by chunk
        self._pending_bytes = 0
        self._needed = 0                # bytes the pending header or record needs in all

    def feed(self, chunk) -> Iterator[Record | StreamHeader]:
        """Records, and each stream header (the first, and any that starts a new segment)."""
        view = memoryview(chunk).cast("B")
        if self._pending:
            self._pending.append(view)
            self._pending_bytes += len(view)
            if self._pending_bytes < self._needed:
                return
            view = memoryview(b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0
        position = 0
        while position < len(view):
            rest = view[position:]
            if self.header is None or starts_segment(rest):
                parsed = parse_stream_header(rest, self.offset)
                if parsed is None:
                    self._keep(rest, _HEADER_V1.size + 8)
                    return
                self.segment_offset = self.offset
                self.header, size = parsed
                self.next_sequence = 0
                position += size
                self.offset += size
                yield self.header
                continue
            needed = self._record_size(rest)
            if needed is None or len(rest) < needed:
                self._keep(rest, needed or RECORD_HEADER_SIZE)
                return
            yield self._check(rest[:needed])
            position += needed
            self.offset += needed

    @property
    def partial_bytes(self) -> int:
        """Bytes of an incomplete header or record held back (non-zero at the end = truncated)."""
        return self._pending_bytes

    def _keep(self, rest: memoryview, needed: int) -> None:
        self._pending, self._pending_bytes, self._needed = [rest], len(rest), needed

    def _record_size(self, data: memoryview) -> int | None:
        if len(data) < RECORD_HEADER_SIZE:
            return None
        length = _U32.unpack_from(data, 4)[0]
        if length > self.record_limit:
            sequence = _U64.unpack_from(data, 16)[0]
            raise corrupt(f"record body of {length} bytes exceeds the record limit of {self.record_limit}",
                          offset=self.offset, sequence=sequence)
        return RECORD_HEADER_SIZE + length

    def _check(self, data: memoryview) -> Record:
        if self.header is None:
            raise corrupt("record before the stream header", offset=self.offset)
        record_type, flags, length, epoch, sequence, checksum = _RECORD_HEADER.unpack_from(data)
        hasher = xxhash.xxh3_64(data[:_CHECKED_HEADER_BYTES], seed=self.header.checksum_seed)
        hasher.update(data[RECORD_HEADER_SIZE:])
        if hasher.intdigest() != checksum:
            raise corrupt("record checksum mismatch", offset=self.offset, sequence=self.next_sequence)
        if sequence != self.next_sequence:
            raise corrupt(f"sequence gap: expected record #{self.next_sequence}, found #{sequence}",
                          offset=self.offset, sequence=sequence, epoch=epoch)
        if flags & ~_KNOWN_FLAGS:
            raise corrupt(f"unknown record flags {flags:#x}", offset=self.offset, sequence=sequence, epoch=epoch)
        self.next_sequence += 1
        if record_type not in RecordType._value2member_map_ and not record_type & OPTIONAL_RECORD:
            reserved = RESERVED_RECORD_TYPES.get(record_type)
            raise corrupt(f"unknown mandatory record type {record_type:#06x}"
                          f"{f' (reserved for {reserved}, not read by this version)' if reserved else ''}",
                          offset=self.offset, sequence=sequence, epoch=epoch)
        return Record(record_type, RecordFlag(flags), epoch, sequence, checksum, self.offset,
                      data[RECORD_HEADER_SIZE:])


class _BodyCursor:
    """Reads fixed fields from a record body, never past its end."""

    def __init__(self, record: Record):
        self.record = record
        self.body = record.body
        self.position = 0

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.position + size > len(self.body):
            raise self.record.error(f"{what}: needs {size} bytes at body offset {self.position}, "
                                    f"body has {len(self.body)}")
        part = self.body[self.position:self.position + size]
        self.position += size
        return part

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what), dtype=dtype)

    def extra(self) -> dict[str, Any]:
        (size,) = self.unpack(_U32, "metadata length")
        if size > MAX_EXTRA_BYTES:
            raise self.record.error(f"metadata of {size} bytes exceeds {MAX_EXTRA_BYTES}")
        raw = bytes(self.take(size, "metadata"))
        try:
            extra = json.loads(raw) if raw else {}
        except (ValueError, RecursionError) as exc:       # RecursionError: absurdly nested JSON
            raise self.record.error(f"metadata is not JSON ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(extra, dict):
            raise self.record.error("metadata is not a JSON object")
        return extra

    def end(self) -> None:
        if self.position != len(self.body):
            raise self.record.error(f"{len(self.body) - self.position} unexpected bytes after the body's fields")


def parse_layout(record: Record, page_size: int | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Regions ({"name","start","first_page","npages"}, plus "dtype" and "shape" for arrays, in record order),
    checked not to overlap (and each array to fit its pages, given ``page_size``), and the other metadata."""
    cursor = _BodyCursor(record)
    count, reserved = cursor.unpack(_PAGES_HEAD, "layout head")
    if count > MAX_REGIONS or reserved:
        raise record.error(f"layout with {count} regions (limit {MAX_REGIONS}) or reserved field {reserved}")
    regions = []
    for index in range(count):
        start, first_page, npages, name_len = cursor.unpack(_REGION, f"layout region {index}")
        try:
            name = bytes(cursor.take(name_len, f"layout region {index} name")).decode("utf-8")
        except UnicodeDecodeError:
            raise record.error(f"layout region {index}: name is not UTF-8") from None
        if first_page + npages > MAX_PAGE_NUMBER:
            raise record.error(f"layout region {index} ({name!r}): pages {first_page}+{npages} beyond the "
                               f"page-number limit {MAX_PAGE_NUMBER}")
        regions.append({"name": name, "start": start, "first_page": first_page, "npages": npages})
    extra = cursor.extra()
    cursor.end()
    _attach_arrays(record, regions, extra.pop(REGION_ARRAYS, {}), page_size)
    try:
        check_regions(Region.from_meta(region, index) for index, region in enumerate(regions))
    except ValueError as exc:
        raise record.error(f"layout {exc}") from None
    return regions, extra


def _attach_arrays(record: Record, regions: list[dict], arrays: Any, page_size: int | None) -> None:
    """Give regions their array dtype and shape from the layout metadata, checked."""
    if not isinstance(arrays, dict):
        raise record.error(f"layout {REGION_ARRAYS} is not a JSON object")
    for key, spec in arrays.items():
        if not key.isdigit() or int(key) >= len(regions) or not isinstance(spec, dict):
            raise record.error(f"layout {REGION_ARRAYS}: entry {key!r} names no region")
        region = regions[int(key)]
        capacity = region["npages"] * page_size if page_size is not None else None
        try:
            region["dtype"], shape = array_spec(spec.get("dtype"), spec.get("shape"), capacity)
        except ValueError as exc:
            raise record.error(f"layout region {key} ({region['name']!r}): {exc}") from None
        region["shape"] = list(shape)


def _check_kinds(record: Record, kinds: np.ndarray) -> None:
    if kinds.size and int(kinds.max()) > _MAX_KIND:
        index = int(np.argmax(kinds > _MAX_KIND))
        raise record.error(f"page entry {index}: unknown page kind {int(kinds[index])}")


def parse_pages(record: Record, page_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(page numbers, kinds, the stored pages (s, page_size)): one row per entry whose kind is not
    ZERO, in entry order. ZERO entries are never expanded into pages (views of the body, no copy)."""
    cursor = _BodyCursor(record)
    count, stored = cursor.unpack(_PAGES_HEAD, "pages head")
    page_numbers = cursor.array("<u8", count, "page numbers")
    kinds = cursor.array("u1", count, "page kinds")
    _check_kinds(record, kinds)
    carries = int(np.count_nonzero(kinds != PageKind.ZERO))
    if carries != stored:
        raise record.error(f"{stored} pages with data announced, kinds say {carries}")
    rows = cursor.array("u1", stored * page_size, "page data").reshape(stored, page_size)
    cursor.end()
    return page_numbers.astype(np.uint64, copy=False), kinds, rows


def expand_pages(kinds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The stored rows of a PAGES record as one page per entry (ZERO entries as zero pages).

    Only for trusted or already bounded input: it costs a page of memory per ZERO entry."""
    if rows.shape[0] == kinds.shape[0]:
        return rows
    data = np.zeros((kinds.shape[0], rows.shape[1]), dtype=np.uint8)
    data[kinds != PageKind.ZERO] = rows
    return data


@dataclass(frozen=True)
class EncodedPages:
    page_numbers: np.ndarray
    kinds: np.ndarray
    offsets: np.ndarray     # uint64 n+1 into the payload before entropy coding
    payload: np.ndarray
    chain: str
    raw_size: int


def parse_encoded(record: Record, page_size: int) -> EncodedPages:
    """Encoded entries, checked: lengths sum to raw_size, whole-page kinds are one page long."""
    cursor = _BodyCursor(record)
    count, chain_len, raw_size, payload_len = cursor.unpack(_ENCODED_HEAD, "encoded head")
    chain = _decode_chain(cursor.take(chain_len, "codec chain"), offset=record.offset, sequence=record.sequence)
    page_numbers = cursor.array("<u8", count, "page numbers")
    kinds = cursor.array("u1", count, "page kinds")
    lengths = cursor.array("<u4", count, "entry lengths")
    payload = cursor.array("u1", payload_len, "payload")
    cursor.end()
    if count:
        _check_kinds(record, kinds)
        # whole-page entries are exactly one page, and no entry is longer than two pages: one pass each
        whole = _IS_WHOLE_PAGE[kinds]
        if whole.any() and (lengths[whole] != page_size).any():
            index = int(np.flatnonzero(whole & (lengths != page_size))[0])
            raise record.error(f"page entry {index}: kind {PageKind(int(kinds[index])).name} is "
                               f"{int(lengths[index])} bytes, not one page of {page_size}")
        if int(lengths.max()) > 2 * page_size:
            raise record.error(f"page entry {int(np.argmax(lengths > 2 * page_size))}: longer than two pages")
    offsets = np.zeros(count + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    if int(offsets[-1]) != raw_size:
        raise record.error(f"entry lengths sum to {int(offsets[-1])}, raw size says {raw_size}")
    if not is_entropy_coded(chain) and payload_len != raw_size:
        raise record.error(f"chain {chain!r} has no entropy layer but payload is {payload_len} bytes, "
                           f"raw size {raw_size}")
    return EncodedPages(page_numbers.astype(np.uint64, copy=False), kinds, offsets, payload, chain, raw_size)


def parse_commit(record: Record, version: int = VERSION) -> Commit:
    cursor = _BodyCursor(record)
    pages, records, digest_of_stream, has_digest, digest, time, pause_ms = cursor.unpack(_COMMIT, "commit")
    layout = cursor.unpack(_LAYOUT_DIGEST, "commit layout digest")[0] if version >= 2 else None
    extra = cursor.extra()
    cursor.end()
    if has_digest not in (0, 1):
        raise record.error(f"commit digest flag {has_digest} is not 0 or 1")
    return Commit(pages, records, digest_of_stream, digest if has_digest else None,
                  None if math.isnan(time) else time, None if math.isnan(pause_ms) else pause_ms, extra, layout)


@dataclass(frozen=True)
class Heartbeat:
    """A heartbeat record's body: when the sender wrote it, and how often it writes them."""

    time: float
    interval_ms: int


def heartbeat_body(heartbeat: Heartbeat) -> list:
    return [_HEARTBEAT.pack(heartbeat.time, heartbeat.interval_ms)]


def parse_heartbeat(record: Record) -> Heartbeat:
    cursor = _BodyCursor(record)
    time, interval_ms = cursor.unpack(_HEARTBEAT, "heartbeat")
    cursor.end()
    if not math.isfinite(time):
        raise record.error(f"heartbeat time {time!r} is not a number")
    return Heartbeat(time, interval_ms)


def parse_end_of_stream(record: Record) -> None:
    _BodyCursor(record).end()
