"""Page codecs: the run formats native, xbzrle (QEMU) and xen (Remus), over the batch kernels.

Policy lives here (argument checks, error messages); the loops live in
``cython_kernels.page_codecs``. Decoding is two passes: the whole payload's
structure is checked first and nothing is written unless all of it is valid,
so a CorruptData from ``decode`` means the replica was not touched.
``digest_decoded`` checks a payload and digests the pages it would make
without writing anything; a payload it accepted may then be applied in one
pass (``decode(..., prechecked=True)``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cython_kernels import page_codecs as _kernels
from pipeline.batch import PageKind
from pipeline.errors import ConfigError, CorruptData
from stages.codecs.encoded import Encoded
from stages.common.pages import check_pages

SYSTEM_PAGE_SIZE = 4096   # the only page size QEMU's and Xen's formats define
_XEN_FULL_PAGE = b"\x80"


def _index_array(values: Any, count: int, name: str) -> np.ndarray:
    """``values`` as a contiguous int64 array of length ``count`` (TypeError/ValueError if not)."""
    array = np.asarray(values)
    if array.dtype.kind not in "ui":
        raise TypeError(f"{name}: expected an integer array, got {array.dtype}")
    if array.shape != (count,):
        raise ValueError(f"{name}: expected shape ({count},), got {array.shape}")
    if array.dtype == np.uint64 and count and array.max() > np.iinfo(np.int64).max:
        return np.full(count, np.iinfo(np.int64).min, dtype=np.int64)   # out of range: rejected by the caller
    return np.ascontiguousarray(array, dtype=np.int64)


def _payload_parts(encoded: Encoded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The payload, offsets and kinds of ``encoded`` as the kernels need them."""
    payload, offsets, kinds = (np.asarray(encoded.payload), np.asarray(encoded.offsets),
                               np.asarray(encoded.kinds))
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise TypeError(f"{encoded.codec}: payload must be a 1-D uint8 array, got {payload.dtype} {payload.shape}")
    if kinds.dtype != np.uint8 or kinds.ndim != 1:
        raise TypeError(f"{encoded.codec}: kinds must be a 1-D uint8 array, got {kinds.dtype} {kinds.shape}")
    if offsets.dtype not in (np.uint32, np.uint64):
        raise TypeError(f"{encoded.codec}: offsets must be uint32 or uint64, got {offsets.dtype}")
    if offsets.shape != (kinds.shape[0] + 1,):
        raise CorruptData(f"{encoded.codec}: {offsets.shape[0] if offsets.ndim == 1 else offsets.shape} offsets "
                          f"for {kinds.shape[0]} pages (need pages + 1)")
    return (np.ascontiguousarray(payload), np.ascontiguousarray(offsets, dtype=np.uint64),
            np.ascontiguousarray(kinds))


class PageCodec:
    """Encode pages against cached copies and apply encodings onto a replica, in one run format."""

    name = ""
    _format = -1
    page_sizes: tuple[int, ...] | None = None   # None: every power of two from 512 to 65536
    _emit_zero = False                          # may a page that became all zeros be sent as ZERO

    def get_config(self) -> dict[str, Any]:
        return {"id": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def max_page_bytes(self, page_size: int) -> int:
        """The most payload bytes one page may take in this format."""
        return int(_kernels.max_page_bytes(self._format, page_size))

    def unchanged_bytes(self) -> bytes:
        """This format's encoding of an unchanged page."""
        return b""

    def check_page_size(self, page_size: int) -> None:
        """Raise ValueError if this format does not define ``page_size``."""
        if self.page_sizes is not None and page_size not in self.page_sizes:
            raise ValueError(f"{self.name}: the format defines only page size "
                             f"{' or '.join(map(str, self.page_sizes))}, got {page_size}")

    # ---- encode --------------------------------------------------------
    def encode(self, current: np.ndarray, cached: np.ndarray, slots: np.ndarray | None = None) -> Encoded:
        """Encode ``current[i]`` against ``cached[i]`` (or ``cached[slots[i]]``); bring ``cached`` up to date.

        Both are ``(n, page_size)`` uint8 C-contiguous arrays (``cached`` writable,
        any number of rows when ``slots`` is given).
        """
        check_pages(current, "current")
        check_pages(cached, "cached", writable=True)
        npages, page_size = current.shape
        if cached.shape[1] != page_size:
            raise ValueError(f"{self.name}: current pages are {page_size} bytes, cached pages {cached.shape[1]}")
        self.check_page_size(page_size)
        if slots is None:
            if cached.shape[0] != npages:
                raise ValueError(f"{self.name}: {npages} current pages but {cached.shape[0]} cached pages "
                                 f"(pass slots= to pick cache rows)")
            slots = np.arange(npages, dtype=np.int64)
        else:
            slots = _index_array(slots, npages, "slots")
            if npages and (slots.min() < 0 or slots.max() >= cached.shape[0]):
                raise IndexError(f"{self.name}: slots must be in 0..{cached.shape[0] - 1}")
        payload = np.empty(_kernels.payload_capacity(self._format, npages, page_size), dtype=np.uint8)
        offsets = np.empty(npages + 1, dtype=np.uint64)
        kinds = np.empty(npages, dtype=np.uint8)
        used = _kernels.encode_pages(self._format, current, cached, slots, payload, offsets, kinds,
                                     self._emit_zero)
        if used < 0:
            raise RuntimeError(f"{self.name}: encode kernel rejected its buffers")  # prevented above
        payload = payload[:used].copy() if used < payload.shape[0] // 2 else payload[:used]
        return Encoded(payload=payload, offsets=offsets, kinds=kinds, codec=self.name, raw_size=used)

    # ---- decode --------------------------------------------------------
    def decode(self, encoded: Encoded, replica: np.ndarray, rows: np.ndarray | None = None, *,
               prechecked: bool = False) -> None:
        """Apply ``encoded`` onto ``replica[i]`` (or ``replica[rows[i]]``) in place.

        Raises CorruptData (and writes nothing) if any length, offset, kind or
        row is invalid; the message names the page index and byte offset.
        ``prechecked``: the payload already passed ``digest_decoded`` (or a
        decode) at this page size, so it is applied in one pass; that pass is
        still bounds-checked, but rows before a bad page would be written.
        """
        check_pages(replica, "replica", writable=True)
        payload, offsets, kinds, rows = self._decode_arguments(encoded, replica, rows)
        where = np.zeros(2, dtype=np.int64)
        for apply in ((True,) if prechecked else (False, True)):
            bad_page = _kernels.walk_payload(self._format, payload, offsets, kinds, replica, rows, apply, where)
            if bad_page >= 0:
                raise CorruptData(self._describe(bad_page, kinds, rows, where))

    def digest_decoded(self, encoded: Encoded, previous: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """The digests (``stages.common.pages.digest_pages``) of the pages ``decode`` would make, writing nothing.

        Page i starts from ``previous[i]`` (or ``previous[rows[i]]``; a row of -1
        is a zero page), which may be read-only. Every page is checked as
        ``decode`` checks it (CorruptData naming the page index and byte offset),
        and each is digested right after it is reconstructed, while in cache.
        """
        check_pages(previous, "previous")
        payload, offsets, kinds, rows = self._decode_arguments(encoded, previous, rows)
        digests = np.empty(kinds.shape[0], dtype=np.uint64)
        scratch = np.empty(previous.shape[1], dtype=np.uint8)
        where = np.zeros(2, dtype=np.int64)
        bad_page = _kernels.digest_decoded(self._format, payload, offsets, kinds, previous, rows, scratch, digests,
                                           where)
        if bad_page >= 0:
            raise CorruptData(self._describe(bad_page, kinds, rows, where))
        return digests

    def _decode_arguments(self, encoded: Encoded, pages: np.ndarray,
                          rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Payload, offsets, kinds and rows of a decode onto ``pages`` (already checked by check_pages)."""
        self.check_page_size(pages.shape[1])
        payload, offsets, kinds = _payload_parts(encoded)
        npages = kinds.shape[0]
        if rows is None:
            if pages.shape[0] != npages:
                raise CorruptData(f"{self.name}: payload has {npages} pages, replica has {pages.shape[0]} rows")
            return payload, offsets, kinds, np.arange(npages, dtype=np.int64)
        return payload, offsets, kinds, _index_array(rows, npages, "rows")

    def _describe(self, page: int, kinds: np.ndarray, rows: np.ndarray, where: np.ndarray) -> str:
        kind = int(kinds[page])
        kind_name = PageKind(kind).name if kind in PageKind._value2member_map_ else str(kind)
        return (f"{self.name} payload: page {page} (kind {kind_name}, replica row {int(rows[page])}), "
                f"byte offset {int(where[0])}: {_kernels.REASONS[int(where[1])]}")

    def system_bytes(self, encoded: Encoded, index: int) -> bytes:
        """Page ``index``'s bytes exactly as the original system would carry them.

        A FULL page is its ``page_size`` bytes here; Xen prefixes it with 0x80.
        """
        payload, offsets, kinds = _payload_parts(encoded)
        start, stop = int(offsets[index]), int(offsets[index + 1])
        return bytes(payload[start:stop])


class NativeCodec(PageCodec):
    """pagepipe's own run format (docs/FORMAT.md): byte runs, short gaps merged, ZERO pages."""

    name = "native"
    _format = _kernels.NATIVE

    def __init__(self, emit_zero: bool = True):
        if not isinstance(emit_zero, bool):
            raise ConfigError(f"native: emit_zero must be True or False, got {emit_zero!r}")
        self._emit_zero = emit_zero

    def get_config(self) -> dict[str, Any]:
        return {"id": self.name, "emit_zero": self._emit_zero}


class XbzrleCodec(PageCodec):
    """QEMU's XBZRLE page encoding, byte for byte (4096-byte pages)."""

    name = "xbzrle"
    _format = _kernels.XBZRLE
    page_sizes = (SYSTEM_PAGE_SIZE,)


class XenCodec(PageCodec):
    """Xen Remus (2011) checkpoint compression page encoding, byte for byte (4096-byte pages)."""

    name = "xen"
    _format = _kernels.XEN
    page_sizes = (SYSTEM_PAGE_SIZE,)

    def unchanged_bytes(self) -> bytes:
        return b"\x00"

    def system_bytes(self, encoded: Encoded, index: int) -> bytes:
        kinds = np.asarray(encoded.kinds)
        encoding = super().system_bytes(encoded, index)
        if kinds[index] in (PageKind.FULL, PageKind.RAW):
            return _XEN_FULL_PAGE + encoding
        if kinds[index] == PageKind.ZERO:
            return _XEN_FULL_PAGE + bytes(SYSTEM_PAGE_SIZE)
        return encoding
