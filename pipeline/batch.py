"""The batch: the unit that flows between stages, and its ZeroMQ multipart form.

A batch holds hundreds of pages as a few contiguous numpy arrays plus a small
header. Control batches (epoch end, layout, end of stream) carry no pages and
say what they are in ``flags`` and ``meta``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag
from typing import Any, Sequence

import numpy as np

from .errors import CorruptData

WIRE_VERSION = 1
DEFAULT_PAGE_SIZE = 4096
MAX_META_BYTES = 1 << 20


class Flag(IntFlag):
    """Header flags of a batch."""

    NONE = 0
    EPOCH_END = 1       # closes ``epoch``; meta["pages"] = pages the epoch carried
    END_OF_STREAM = 2   # no batch follows on this stream
    LAYOUT = 4          # meta["regions"] describes the tracked memory (see Layout)
    RESYNC = 8          # this epoch carries every tracked page whole


class PageKind(IntEnum):
    """What one page entry of a batch is. Codecs and stages share these values."""

    NORMAL = 0      # tracker output: page contents, to be delta-encoded
    ZERO = 1        # the page is all zeros; no data needs to travel
    RAW = 2         # bypasses the XOR cache; sent as-is (Xen's pagetable pages)
    FULL = 3        # sent whole (cache miss, or its delta would not be smaller)
    DELTA = 4       # encoded against the copy last sent
    UNCHANGED = 5   # equal to the copy last sent; nothing travels


_CONTROL_FLAGS = int(Flag.EPOCH_END | Flag.END_OF_STREAM | Flag.LAYOUT)  # plain int: IntFlag arithmetic is slow

# Batch formats ("caps"): which arrays a batch carries and what they mean.
PAGES = "pages"       # data = page contents; kinds NORMAL/ZERO/RAW
DELTAS = "deltas"     # data = page contents, reference = copies last sent (for kind DELTA)
ENCODED = "encoded"   # payload + offsets: per-page encodings; meta["codec"] names the chain
STREAM = "stream"     # payload = framed wire bytes (docs/FORMAT.md)
ANY = "any"           # accepted by stages that do not look inside (sinks, tee)
FORMATS = (PAGES, DELTAS, ENCODED, STREAM, ANY)

_ARRAY_DTYPES = {
    "page_numbers": np.uint64,
    "kinds": np.uint8,
    "data": np.uint8,
    "reference": np.uint8,
    "payload": np.uint8,
    "offsets": np.uint64,
}


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
        return sum(a.nbytes for a in self._arrays().values())

    def with_(self, **changes: Any) -> "Batch":
        """A copy with some fields replaced (arrays are shared, not copied)."""
        return replace(self, **changes)

    @classmethod
    def control(cls, flags: Flag, epoch: int, *, format: str = PAGES, stream: int = 0,
                page_size: int = DEFAULT_PAGE_SIZE, sequence: int = 0, **meta: Any) -> "Batch":
        """A marker batch with no pages."""
        return cls(format=format, epoch=epoch, flags=Flag(flags), stream=stream,
                   page_size=page_size, sequence=sequence, meta=dict(meta))

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"page_numbers": self.page_numbers, "kinds": self.kinds}
        for name in ("data", "reference", "payload", "offsets"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        return arrays

    # ---- wire form ---------------------------------------------------
    def to_frames(self) -> list:
        """One ZeroMQ multipart message: a JSON header, then one frame per array.

        Arrays are passed as buffers so pyzmq can send large ones without copying.
        """
        arrays = self._arrays()
        header = {
            "v": WIRE_VERSION,
            "format": self.format,
            "epoch": int(self.epoch),
            "sequence": int(self.sequence),
            "flags": int(self.flags),
            "stream": int(self.stream),
            "page_size": int(self.page_size),
            "arrays": {name: list(a.shape) for name, a in arrays.items()},
            "meta": self.meta,
        }
        frames: list = [json.dumps(header, separators=(",", ":")).encode()]
        for name, array in arrays.items():
            frames.append(memoryview(np.ascontiguousarray(array, dtype=_ARRAY_DTYPES[name])).cast("B"))
        return frames

    @classmethod
    def from_frames(cls, frames: Sequence) -> "Batch":
        """Rebuild a batch from untrusted frames; every shape and length is checked.

        Raises CorruptData saying which part is wrong.
        """
        if not frames:
            raise CorruptData("batch message: no frames")
        raw_header = bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        if len(raw_header) > MAX_META_BYTES:
            raise CorruptData(f"batch header: {len(raw_header)} bytes exceeds limit {MAX_META_BYTES}")
        try:
            header = json.loads(raw_header)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptData(f"batch header: not JSON ({exc})") from None
        if not isinstance(header, dict) or header.get("v") != WIRE_VERSION:
            raise CorruptData(f"batch header: unsupported version {header.get('v') if isinstance(header, dict) else header!r}")
        try:
            shapes = header["arrays"]
            names = list(shapes)
            if len(frames) != 1 + len(names):
                raise CorruptData(f"batch message: {len(frames)} frames for {len(names)} arrays")
            arrays = {}
            for name, frame in zip(names, frames[1:]):
                if name not in _ARRAY_DTYPES:
                    raise CorruptData(f"batch message: unknown array {name!r}")
                shape = tuple(int(s) for s in shapes[name])
                if any(s < 0 for s in shape) or len(shape) not in (1, 2):
                    raise CorruptData(f"batch array {name!r}: bad shape {shape}")
                buffer = frame.buffer if hasattr(frame, "buffer") else frame
                array = np.frombuffer(buffer, dtype=_ARRAY_DTYPES[name])
                if array.size != math.prod(shape):
                    raise CorruptData(f"batch array {name!r}: {array.size} elements, header says shape {shape}")
                arrays[name] = array.reshape(shape)
            batch = cls(
                format=str(header["format"]),
                epoch=int(header["epoch"]),
                sequence=int(header["sequence"]),
                flags=Flag(int(header["flags"])),
                stream=int(header["stream"]),
                page_size=int(header["page_size"]),
                meta=dict(header.get("meta") or {}),
                **arrays,
            )
        except CorruptData:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptData(f"batch header: malformed ({exc!r})") from None
        batch.validate()
        return batch

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
            # An entropy-coded payload ("native+zstd") is indexed after decompression: the decode stage bounds it.
            entropy_coded = "+" in str(self.meta.get("codec", ""))
            if n and (self.offsets[0] != 0 or np.any(np.diff(self.offsets.astype(np.int64)) < 0)
                      or (not entropy_coded and int(self.offsets[-1]) > payload_len)):
                raise CorruptData(f"batch epoch {self.epoch}: offsets not increasing within payload of {payload_len} bytes")
