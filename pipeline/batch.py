"""The batch: the unit that flows between stages, and its ZeroMQ multipart form.

A batch holds hundreds of pages as a few contiguous numpy arrays plus a small
header. Control batches (epoch end, layout, end of stream) carry no pages and
say what they are in ``flags`` and ``meta``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum, IntFlag
from typing import Any, Sequence

import numpy as np

from .errors import CorruptData

WIRE_VERSION = 2
DEFAULT_PAGE_SIZE = 4096
MAX_META_BYTES = 1 << 20
INLINE_BYTES = 1 << 16
"""Arrays smaller than this travel inside the header frame (no frame of their own); larger ones get a frame."""


class Flag(IntFlag):
    """Header flags of a batch."""

    NONE = 0
    EPOCH_END = 1       # closes ``epoch``; meta["pages"] = pages the epoch carried
    END_OF_STREAM = 2   # no batch follows on this stream
    LAYOUT = 4          # meta["regions"] describes the tracked memory (see Layout)
    RESYNC = 8          # this epoch carries every tracked page whole
    SENDER_LOST = 16    # the receiving source heard nothing from the sender for its failover-after: it is gone

    # Bitwise results come from a table of the defined values: IntFlag builds each one through the enum
    # machinery, a few microseconds each, and stages test flags several times a batch.
    def __and__(self, other: Any) -> "Flag":
        return _flag(int.__and__(self, other)) if isinstance(other, int) else NotImplemented

    def __or__(self, other: Any) -> "Flag":
        return _flag(int.__or__(self, other)) if isinstance(other, int) else NotImplemented

    __rand__ = __and__
    __ror__ = __or__


class PageKind(IntEnum):
    """What one page entry of a batch is. Codecs and stages share these values."""

    NORMAL = 0      # tracker output: page contents, to be delta-encoded
    ZERO = 1        # the page is all zeros; no data needs to travel
    RAW = 2         # bypasses the XOR cache; sent as-is (Xen's pagetable pages)
    FULL = 3        # sent whole (cache miss, or its delta would not be smaller)
    DELTA = 4       # encoded against the copy last sent
    UNCHANGED = 5   # equal to the copy last sent; nothing travels


# The page kinds as plain ints, for per-batch code: in Python 3.11 each IntEnum member access costs about a
# microsecond, and numpy compares plain ints faster too.
KIND_NORMAL, KIND_ZERO, KIND_RAW, KIND_FULL, KIND_DELTA, KIND_UNCHANGED = map(int, PageKind)


_FLAG_VALUES = tuple(Flag(value) for value in range(2 * max(Flag)))


def _flag(value: int) -> Flag:
    """Flag(value) from a table for the defined bits: building an IntFlag costs microseconds a batch."""
    return _FLAG_VALUES[value] if 0 <= value < len(_FLAG_VALUES) else Flag(value)


_CONTROL_FLAGS = int(Flag.EPOCH_END | Flag.END_OF_STREAM | Flag.LAYOUT | Flag.SENDER_LOST)  # plain int: IntFlag arithmetic is slow

# Batch formats ("caps"): which arrays a batch carries and what they mean.
PAGES = "pages"       # data = page contents; kinds NORMAL/ZERO/RAW
DELTAS = "deltas"     # data = page contents, reference = copies last sent (for kind DELTA)
ENCODED = "encoded"   # payload + offsets: per-page encodings; meta["codec"] names the chain
STREAM = "stream"     # payload = framed wire bytes (docs/FORMAT.md)
ANY = "any"           # accepted by stages that do not look inside (sinks, tee)
FORMATS = (PAGES, DELTAS, ENCODED, STREAM, ANY)

_ARRAY_DTYPES: dict[str, np.dtype] = {
    "page_numbers": np.dtype(np.uint64),
    "kinds": np.dtype(np.uint8),
    "data": np.dtype(np.uint8),
    "reference": np.dtype(np.uint8),
    "payload": np.dtype(np.uint8),
    "offsets": np.dtype(np.uint64),
}
_ARRAY_NAMES = tuple(_ARRAY_DTYPES)
_ARRAY_TABLE = tuple((code, name, _ARRAY_DTYPES[name]) for code, name in enumerate(_ARRAY_NAMES))
_FORMAT_CODES = {name: code for code, name in enumerate(FORMATS)}

# Wire form (binary, little-endian; JSON only for a non-empty meta, because json costs tens of microseconds a batch):
# header frame = _HEADER, count x _ARRAY, meta JSON, then the inline arrays, each at an 8-byte aligned offset.
_MAGIC = b"PB"
_HEADER = struct.Struct("<2sBBBxxxIqqqII")  # magic, version, format, array count, flags, epoch, sequence,
#                                              stream, page size, meta length
_ARRAY = struct.Struct("<BBBxxxxxQQ")       # array code, ndim, inline, rows, columns (0 when 1-D)
_INLINE_ALIGNMENT = 8
_PADDING = tuple(bytes(size) for size in range(_INLINE_ALIGNMENT))
_decode_json = json.JSONDecoder().decode  # from str: json.loads would first guess the encoding of bytes
_encode_json = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds an encoder per call for these
_MAX_DIMENSION = 1 << 48


_UINT8 = np.dtype(np.uint8)


def frame_buffer(frame: Any) -> memoryview:
    """The bytes of a message part: a memoryview as it is, a zmq Frame's buffer, or a view of bytes or an array."""
    if type(frame) is memoryview:
        return frame
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _empty_pages() -> np.ndarray:
    return np.empty(0, dtype=np.uint64)


def _empty_kinds() -> np.ndarray:
    return np.empty(0, dtype=np.uint8)


@dataclass
class Batch:
    """Pages of one epoch, or a control marker.

    ``page_numbers[i]`` and ``kinds[i]`` describe entry i; depending on
    ``format`` its bytes are ``data[i]`` (PAGES, DELTAS) or
    ``payload[offsets[i]:offsets[i+1]]`` (ENCODED).
    """

    format: str = PAGES
    epoch: int = 0
    sequence: int = 0
    flags: Flag = Flag.NONE
    stream: int = 0
    page_size: int = DEFAULT_PAGE_SIZE
    page_numbers: np.ndarray = field(default_factory=_empty_pages)
    kinds: np.ndarray = field(default_factory=_empty_kinds)
    data: np.ndarray | None = None
    reference: np.ndarray | None = None
    payload: np.ndarray | None = None
    offsets: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- convenience -------------------------------------------------
    @property
    def npages(self) -> int:
        return int(self.page_numbers.shape[0])

    @property
    def is_control(self) -> bool:
        """True for markers that carry no pages (epoch end, layout, end of stream)."""
        return int(self.flags) & _CONTROL_FLAGS != 0 and self.npages == 0

    @property
    def nbytes(self) -> int:
        """Bytes of array data this batch holds (what flow control counts)."""
        total = self.page_numbers.nbytes + self.kinds.nbytes
        for array in (self.data, self.reference, self.payload, self.offsets):
            if array is not None:
                total += array.nbytes
        return total

    def with_(self, **changes: Any) -> "Batch":
        """A copy with some fields replaced (arrays are shared, not copied).

        As ``dataclasses.replace`` (TypeError for an unknown field), without its cost per batch.
        """
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            raise TypeError(f"Batch has no field(s) {', '.join(sorted(unknown))}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    @classmethod
    def control(cls, flags: Flag, epoch: int, *, format: str = PAGES, stream: int = 0,
                page_size: int = DEFAULT_PAGE_SIZE, sequence: int = 0, **meta: Any) -> "Batch":
        """A marker batch with no pages."""
        return cls(format=format, epoch=epoch, flags=Flag(flags), stream=stream,
                   page_size=page_size, sequence=sequence, meta=dict(meta))

    # ---- wire form ---------------------------------------------------
    def to_frames(self) -> list:
        """One ZeroMQ multipart message: a binary header frame, then one frame per large array.

        The header (``_HEADER``, one ``_ARRAY`` entry per array, JSON meta only
        when meta is non-empty) also carries arrays under ``INLINE_BYTES``, so a
        small batch is a single frame. Large arrays are passed as buffers so
        pyzmq (or a shared-memory ring) can move them without an extra copy.
        """
        format_code = _FORMAT_CODES.get(self.format)
        if format_code is None:
            raise CorruptData(f"batch epoch {self.epoch}: unknown format {self.format!r}")
        meta = _encode_json(self.meta).encode() if self.meta else b""
        fields = self.__dict__
        arrays = [(code, dtype, array) for code, name, dtype in _ARRAY_TABLE
                  if (array := fields[name]) is not None]
        descriptors: list[bytes] = []
        body: list[Any] = [meta]  # bytes and contiguous arrays: b"".join takes their buffers
        frames: list[bytes | memoryview] = [b""]
        position = _HEADER.size + len(arrays) * _ARRAY.size + len(meta)
        for code, dtype, array in arrays:
            if array.dtype != dtype or not array.flags.c_contiguous:
                array = np.ascontiguousarray(array, dtype=dtype)
            nbytes = array.nbytes
            inline = nbytes < INLINE_BYTES
            descriptors.append(_ARRAY.pack(code, array.ndim, inline, array.shape[0],
                                           array.shape[1] if array.ndim == 2 else 0))
            if inline:  # joined into the header: any contiguous array's bytes, also with a zero in its shape
                padding = -position % _INLINE_ALIGNMENT
                body += [_PADDING[padding], array]
                position += padding + nbytes
            else:
                frames.append(memoryview(array).cast("B"))  # 1-D bytes: len() is the size
        header = _HEADER.pack(_MAGIC, WIRE_VERSION, format_code, len(arrays), int(self.flags), int(self.epoch),
                              int(self.sequence), int(self.stream), int(self.page_size), len(meta))
        frames[0] = b"".join([header, *descriptors, *body])
        return frames

    @classmethod
    def from_frames(cls, frames: Sequence) -> "Batch":
        """Rebuild a batch from untrusted frames; every count, shape and length is checked.

        Raises CorruptData saying which part is wrong.
        """
        if not frames:
            raise CorruptData("batch message: no frames")
        batch, used = cls._from_frames_at(frames, 0)
        if used != len(frames):
            raise CorruptData(f"batch message: {len(frames)} frames for {used - 1} frame arrays")
        return batch

    @classmethod
    def bundle_from_frames(cls, frames: Sequence) -> list["Batch"]:
        """The batches of a message carrying one or more of them back to back (each as ``to_frames`` makes it).

        The runtime sends small batches bound for the same worker at the same moment as one message, as each
        ZeroMQ message costs tens of microseconds of CPU on either side. Checked as ``from_frames``.
        """
        if not frames:
            raise CorruptData("batch message: no frames")
        batches, position = [], 0
        while position < len(frames):
            batch, position = cls._from_frames_at(frames, position)
            batches.append(batch)
        return batches

    @classmethod
    def next_from_frames(cls, frames: Sequence, start: int) -> tuple["Batch", int]:
        """The batch whose header is ``frames[start]`` in a message of several, and the index of the frame after
        its last one. Checked as ``from_frames``."""
        if not 0 <= start < len(frames):
            raise CorruptData(f"batch message: no frame {start} among {len(frames)}")
        return cls._from_frames_at(frames, start)

    @classmethod
    def _from_frames_at(cls, frames: Sequence, start: int) -> tuple["Batch", int]:
        """The batch whose header is ``frames[start]``, and the index of the frame after its last one."""
        header = frame_buffer(frames[start])
        size = header.nbytes
        if size < _HEADER.size:
            raise CorruptData(f"batch header: {size} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, format_code, count, flags, epoch, sequence, stream, page_size, meta_length = \
            _HEADER.unpack_from(header)
        if magic != _MAGIC or version != WIRE_VERSION:
            raise CorruptData(f"batch header: not a version {WIRE_VERSION} batch (magic {magic!r}, version {version})")
        if format_code >= len(FORMATS):
            raise CorruptData(f"batch header: unknown format code {format_code}")
        if count > len(_ARRAY_NAMES):
            raise CorruptData(f"batch header: {count} arrays, at most {len(_ARRAY_NAMES)} exist")
        position = _HEADER.size + count * _ARRAY.size
        if meta_length > MAX_META_BYTES or position + meta_length > size:
            raise CorruptData(f"batch header: meta of {meta_length} bytes does not fit a {size}-byte header")
        meta = {}
        if meta_length:
            try:
                meta = _decode_json(str(header[position:position + meta_length], "utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise CorruptData(f"batch header: meta is not JSON ({exc})") from None
            if not isinstance(meta, dict):
                raise CorruptData(f"batch header: meta is a {type(meta).__name__}, not an object")
        descriptors = _ARRAY.iter_unpack(header[_HEADER.size:_HEADER.size + count * _ARRAY.size])
        position += meta_length
        arrays = {}
        next_frame = start + 1
        for code, ndim, inline, rows, columns in descriptors:
            if code >= len(_ARRAY_NAMES) or _ARRAY_NAMES[code] in arrays:
                raise CorruptData(f"batch message: unknown or repeated array code {code}")
            _, name, dtype = _ARRAY_TABLE[code]
            if ndim not in (1, 2) or inline > 1 or (ndim == 1 and columns != 0) \
                    or rows > _MAX_DIMENSION or columns > _MAX_DIMENSION:
                raise CorruptData(f"batch array {name!r}: bad shape ({rows}, {columns}) of {ndim} dimensions")
            elements = rows if ndim == 1 else rows * columns
            nbytes = elements * dtype.itemsize
            if inline:
                position += -position % _INLINE_ALIGNMENT
                if position + nbytes > size:
                    raise CorruptData(f"batch array {name!r}: {nbytes} bytes beyond the {size}-byte header")
                array = np.frombuffer(header, dtype, elements, position)
                position += nbytes
            else:
                if next_frame >= len(frames):
                    raise CorruptData(f"batch message: {len(frames)} frames, array {name!r} needs frame "
                                      f"{next_frame}")
                frame = frames[next_frame]
                next_frame += 1
                ring_bytes = type(frame) is np.ndarray and frame.dtype == _UINT8 and frame.ndim == 1
                buffer = None if ring_bytes else frame_buffer(frame)
                found = frame.shape[0] if buffer is None else buffer.nbytes
                if found != nbytes:
                    raise CorruptData(f"batch array {name!r}: {found} bytes, header says shape "
                                      f"{(rows,) if ndim == 1 else (rows, columns)} ({nbytes} bytes)")
                if buffer is not None:
                    array = np.frombuffer(buffer, dtype)
                else:   # a ring's bytes (pipeline.shm): a view of them, without a buffer round trip
                    array = frame if dtype == _UINT8 else frame.view(dtype)
            arrays[name] = array if ndim == 1 else array.reshape(rows, columns)
        if position != size:
            raise CorruptData(f"batch header: {size - position} bytes left over after its arrays")
        batch = object.__new__(cls)   # what the dataclass __init__ does, without its cost per batch
        batch.__dict__.update(
            format=FORMATS[format_code], epoch=epoch, sequence=sequence, flags=_flag(flags), stream=stream,
            page_size=page_size, page_numbers=arrays.get("page_numbers"), kinds=arrays.get("kinds"),
            data=arrays.get("data"), reference=arrays.get("reference"), payload=arrays.get("payload"),
            offsets=arrays.get("offsets"), meta=meta)
        if batch.page_numbers is None:
            batch.page_numbers = _empty_pages()
        if batch.kinds is None:
            batch.kinds = _empty_kinds()
        batch.validate()
        return batch, next_frame

    def validate(self) -> None:
        """Check that the arrays agree with each other; raise CorruptData if not."""
        n = self.npages
        if self.format not in FORMATS:
            raise CorruptData(f"batch epoch {self.epoch}: unknown format {self.format!r}")
        if self.kinds.shape != (n,):
            raise CorruptData(f"batch epoch {self.epoch}: {self.kinds.shape[0]} kinds for {n} pages")
        for name in ("data", "reference"):
            array = getattr(self, name)
            if array is not None and array.shape != (n, self.page_size):
                raise CorruptData(f"batch epoch {self.epoch}: {name} shape {array.shape}, expected {(n, self.page_size)}")
        if self.offsets is not None:
            if self.offsets.shape != (n + 1,):
                raise CorruptData(f"batch epoch {self.epoch}: {self.offsets.shape[0]} offsets for {n} pages")
            payload_len = 0 if self.payload is None else self.payload.shape[0]
            # Offsets index the payload, unless the batch declares the size it unpacks to (meta["raw_size"]):
            # then the stages that read it, which know its codec, bound them (stages.common.checks).
            bounded = "raw_size" not in self.meta
            offsets = self.offsets
            if n and (offsets[0] != 0 or (offsets[1:] < offsets[:-1]).any()
                      or (bounded and int(self.offsets[-1]) > payload_len)):
                raise CorruptData(f"batch epoch {self.epoch}: offsets not increasing within payload of {payload_len} bytes")


_FIELD_NAMES = frozenset(item.name for item in fields(Batch))
