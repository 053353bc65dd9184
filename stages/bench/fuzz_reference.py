"""Reference decoders for the codec fuzzer: docs/FORMAT.md (page-encodings) read literally, in plain Python.

Written from the format text, not from the kernels, so the fuzzer can check the
Cython decoders against an independent reading: ``reference_decode`` returns the
pages a batch makes, or None where the format says the batch is invalid. Slow
(a loop per run), which is fine for the small batches the fuzzer makes.
"""
from __future__ import annotations

import lz4.block
import numpy as np
import zstandard

ZERO, RAW, FULL, DELTA, UNCHANGED = 1, 2, 3, 4, 5


class Invalid(Exception):
    """The format says this encoding is invalid."""


def _uleb(data: bytes, at: int, most_bytes: int) -> tuple[int, int]:
    """(value, bytes used) of the ULEB128 at ``at``, at most ``most_bytes`` long."""
    value = 0
    for index in range(most_bytes):
        if at + index >= len(data):
            raise Invalid("ULEB128 cut short")
        byte = data[at + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise Invalid("ULEB128 too long")


def _native_delta(page: bytearray, data: bytes) -> None:
    if not data:
        raise Invalid("empty DELTA")
    at = position = 0
    while at < len(data):
        skip, used = _uleb(data, at, 3)
        at += used
        length, used = _uleb(data, at, 3)
        at += used
        length += 1
        position += skip
        if position + length > len(page) or at + length > len(data):
            raise Invalid("run passes the page or the slice")
        page[position:position + length] = data[at:at + length]
        at += length
        position += length


def _xbzrle_delta(page: bytearray, data: bytes) -> None:
    """QEMU's xbzrle_decode_buffer: pairs (zrun, nzrun + data), each length read with 2 bytes left."""
    if not data or len(data) > 4096:
        raise Invalid("slice empty or longer than a page")
    at = position = 0
    while at < len(data):
        if len(data) - at < 2:
            raise Invalid("fewer than 2 bytes before a zrun")
        zrun, used = _uleb(data, at, 2)
        if at and not zrun:
            raise Invalid("zero zrun after the first pair")
        at += used
        position += zrun
        if position > len(page):
            raise Invalid("zrun passes the page")
        if len(data) - at < 2:
            raise Invalid("fewer than 2 bytes before an nzrun")
        nzrun, used = _uleb(data, at, 2)
        if not nzrun:
            raise Invalid("empty nzrun")
        at += used
        if position + nzrun > len(page) or at + nzrun > len(data):
            raise Invalid("nzrun passes the page or the slice")
        page[position:position + nzrun] = data[at:at + nzrun]
        at += nzrun
        position += nzrun


def _xen_delta(page: bytearray, data: bytes) -> None:
    """Runs of 32-bit words: header h, count h & 0x7f >= 1; skip (bit 7) or copy; ending at both ends."""
    at = word = 0
    words = len(page) // 4
    while at < len(data):
        header = data[at]
        at += 1
        count = header & 0x7F
        if not count or word + count > words:
            raise Invalid("bad run count")
        if not header & 0x80:
            if at + 4 * count > len(data):
                raise Invalid("copy run passes the slice")
            page[4 * word:4 * (word + count)] = data[at:at + 4 * count]
            at += 4 * count
        word += count
    if word != words:
        raise Invalid("runs do not end at the page end")


_DELTAS = {"native": _native_delta, "xbzrle": _xbzrle_delta, "xen": _xen_delta}
_UNCHANGED = {"native": b"", "xbzrle": b"", "xen": b"\x00"}
_LARGEST = {"native": lambda size: size, "xbzrle": lambda size: size, "xen": lambda size: size + 16}


def _decode_page(run_format: str, kind: int, data: bytes, page: bytearray) -> None:
    if kind == ZERO:
        if data:
            raise Invalid("ZERO with bytes")
        page[:] = bytes(len(page))
    elif kind in (RAW, FULL):
        if len(data) != len(page):
            raise Invalid("whole page of the wrong length")
        page[:] = data
    elif kind == UNCHANGED:
        if data != _UNCHANGED[run_format]:
            raise Invalid("UNCHANGED with other bytes")
    elif kind == DELTA:
        _DELTAS[run_format](page, data)
    else:
        raise Invalid("unknown kind")


def _decompress(layer: str, payload: bytes, raw_size: int) -> bytes:
    if layer == "zstd":
        params = zstandard.get_frame_parameters(payload)
        if params.content_size != raw_size:
            raise Invalid("frame size is not the raw size")
        if raw_size == 0:       # decompressobj does not report the end of an empty frame
            if zstandard.ZstdDecompressor().decompress(payload, allow_extra_data=False) != b"":
                raise Invalid("empty frame with content")
            return b""
        reader = zstandard.ZstdDecompressor().decompressobj()
        raw = reader.decompress(payload)
        if not reader.eof or reader.unused_data or len(raw) != raw_size:
            raise Invalid("frame incomplete, followed by bytes, or of another size")
        return raw
    raw = lz4.block.decompress(payload, uncompressed_size=raw_size)
    if len(raw) != raw_size:
        raise Invalid("block of another size")
    return raw


def reference_decode(chain: str, payload: bytes, offsets: list[int], kinds: list[int], raw_size: int,
                     previous: np.ndarray) -> np.ndarray | None:
    """The pages the batch makes from ``previous`` (n, page_size), or None if the format says it is invalid."""
    run_format, _, layer = chain.partition("+")
    pages = [bytearray(row.tobytes()) for row in previous]
    page_size = previous.shape[1]
    try:
        if run_format in ("xbzrle", "xen") and page_size != 4096:
            raise Invalid("format defined for 4096-byte pages only")
        if len(offsets) != len(kinds) + 1:
            raise Invalid("offsets do not match the kinds")
        if layer:
            if not 0 <= raw_size <= len(kinds) * _LARGEST[run_format](page_size) or offsets[-1] != raw_size:
                raise Invalid("raw size out of bounds or not the last offset")
            try:
                payload = _decompress(layer, payload, raw_size)
            except Invalid:
                raise
            except Exception as exc:          # the library's own errors: not a frame or block
                raise Invalid(str(exc)) from None
        if kinds and offsets[0] != 0:
            raise Invalid("offsets do not start at 0")
        for index, kind in enumerate(kinds):
            start, stop = offsets[index], offsets[index + 1]
            if stop < start or stop > len(payload):
                raise Invalid("slice outside the payload")
            _decode_page(run_format, kind, payload[start:stop], pages[index])
    except Invalid:
        return None
    return np.frombuffer(b"".join(pages), dtype=np.uint8).reshape(previous.shape).copy()
