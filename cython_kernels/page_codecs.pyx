"""Batch kernels of the page run formats: encode pages against cached copies, check and apply payloads.

Private: call them through ``stages.codecs``, which validates dtypes, shapes,
slots and rows first. Formats are chosen by number (NATIVE, XBZRLE, XEN); the
per-page loops live in ``native_format.pxd``, ``xbzrle_format.pxd`` and
``xen_format.pxd``. Errors in the data are returned, never raised: a page index
plus ``where = [payload byte offset, reason]``.
"""
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

from cython_kernels.native_format cimport native_walk_page
from cython_kernels.page_encode cimport (
    ENCODE_NATIVE as FORMAT_NATIVE, ENCODE_XBZRLE as FORMAT_XBZRLE, ENCODE_XEN as FORMAT_XEN,
    PAGE_DELTA as KIND_DELTA, PAGE_FULL as KIND_FULL, PAGE_RAW as KIND_RAW,
    PAGE_UNCHANGED as KIND_UNCHANGED, PAGE_ZERO as KIND_ZERO, encode_page, encode_room,
)
from cython_kernels.run_scan cimport BAD_KIND, BAD_OFFSETS, BAD_ROW, BAD_SLICE_LENGTH, COPY_SLACK, VALID
from cython_kernels.xbzrle_format cimport xbzrle_walk_page
from cython_kernels.xen_format cimport xen_walk_page
from cython_kernels.xxh64 cimport STRIPE, xxh64_page

NATIVE = FORMAT_NATIVE
XBZRLE = FORMAT_XBZRLE
XEN = FORMAT_XEN

KINDS = {"ZERO": KIND_ZERO, "RAW": KIND_RAW, "FULL": KIND_FULL, "DELTA": KIND_DELTA,
         "UNCHANGED": KIND_UNCHANGED}

# Indexed by reason code (run_scan.pxd, enum Reason).
REASONS = (
    "valid",
    "offsets decrease, do not start at 0, or point past the payload",
    "unknown page kind",
    "slice length does not match the page kind",
    "empty DELTA slice",
    "run truncated by the end of the slice",
    "run goes past the end of the page",
    "invalid run header",
    "bytes left over after the page is complete (or a slice longer than the format allows)",
    "row outside the replica",
)


cdef Py_ssize_t room_per_page(int fmt, Py_ssize_t page_size) noexcept nogil:
    return encode_room(fmt, page_size)


def max_page_bytes(int fmt, Py_ssize_t page_size):
    """The most bytes one page's encoding takes in format ``fmt``."""
    return room_per_page(fmt, page_size)


def payload_capacity(int fmt, Py_ssize_t npages, Py_ssize_t page_size):
    """Payload buffer ``encode_pages`` needs for ``npages`` pages (their largest encodings plus copy slack)."""
    return npages * room_per_page(fmt, page_size) + COPY_SLACK


def encode_pages(int fmt, const uint8_t[:, ::1] current, uint8_t[:, ::1] cached,
                 const int64_t[::1] slots, uint8_t[::1] payload, uint64_t[::1] offsets,
                 uint8_t[::1] kinds, bint emit_zero):
    """Encode ``current[i]`` against ``cached[slots[i]]`` (updated in place) into ``payload``.

    Fills ``offsets`` (n + 1) and ``kinds`` (n); returns the payload length, or -1
    if ``payload`` is too small or a slot is out of range (callers prevent both).
    """
    cdef Py_ssize_t length
    with nogil:
        length = _encode_pages(fmt, current, cached, slots, payload, offsets, kinds, emit_zero)
    return length


cdef Py_ssize_t _encode_pages(int fmt, const uint8_t[:, ::1] current, uint8_t[:, ::1] cached,
                              const int64_t[::1] slots, uint8_t[::1] payload, uint64_t[::1] offsets,
                              uint8_t[::1] kinds, bint emit_zero) noexcept nogil:
    cdef Py_ssize_t n = current.shape[0], size = current.shape[1]
    cdef Py_ssize_t capacity = payload.shape[0], room = room_per_page(fmt, size)
    cdef Py_ssize_t i, d = 0, length
    cdef int64_t slot
    cdef uint8_t kind
    cdef uint8_t *out = &payload[0] if capacity else NULL
    for i in range(n):
        slot = slots[i]
        if slot < 0 or slot >= cached.shape[0] or capacity - d < room + COPY_SLACK:
            return -1
        length = encode_page(fmt, &current[i, 0], &cached[slot, 0], size, out + d, emit_zero, &kind)
        offsets[i] = d
        kinds[i] = kind
        d += length
    offsets[n] = d
    return d


def walk_payload(int fmt, const uint8_t[::1] payload, const uint64_t[::1] offsets,
                 const uint8_t[::1] kinds, uint8_t[:, ::1] replica, const int64_t[::1] rows,
                 bint apply, int64_t[::1] where):
    """Check every page of a payload, or (``apply``) also write it onto ``replica[rows[i]]``.

    Returns -1 if all is well, else the index of the first bad page with
    ``where = [payload byte offset, reason]``; in check mode nothing is written.
    """
    cdef Py_ssize_t bad_page
    with nogil:
        bad_page = _walk_payload(fmt, payload, offsets, kinds, replica, rows, apply, where)
    return bad_page


cdef inline int slice_bounds(const uint64_t[::1] offsets, Py_ssize_t i, Py_ssize_t payload_len,
                             Py_ssize_t *start, Py_ssize_t *slen) noexcept nogil:
    """Page ``i``'s slice of the payload; BAD_OFFSETS unless it lies inside the payload, in order."""
    cdef uint64_t first = offsets[i], stop = offsets[i + 1]
    start[0] = <Py_ssize_t>first
    if stop < first or stop > <uint64_t>payload_len or (i == 0 and first != 0):
        return BAD_OFFSETS
    slen[0] = <Py_ssize_t>(stop - first)
    return VALID


cdef inline int walk_page(int fmt, const uint8_t *src, Py_ssize_t slen, uint8_t kind, uint8_t *page,
                          Py_ssize_t size, bint apply, Py_ssize_t *at) noexcept nogil:
    """Check one page's slice (``apply``: also write it onto ``page``); return a Reason, ``at`` = slice offset."""
    cdef uint8_t unchanged_len = 1 if fmt == FORMAT_XEN else 0
    at[0] = 0
    if kind == KIND_UNCHANGED:
        if slen != unchanged_len or (unchanged_len and src[0] != 0):
            return BAD_SLICE_LENGTH
    elif kind == KIND_ZERO:
        if slen != 0:
            return BAD_SLICE_LENGTH
        if apply:
            memset(page, 0, size)
    elif kind == KIND_FULL or kind == KIND_RAW:
        if slen != size:
            return BAD_SLICE_LENGTH
        if apply:
            memcpy(page, src, size)
    elif kind == KIND_DELTA:
        if fmt == FORMAT_NATIVE:
            return native_walk_page(src, slen, page, size, apply, at)
        if fmt == FORMAT_XBZRLE:
            return xbzrle_walk_page(src, slen, page, size, apply, at)
        return xen_walk_page(src, slen, page, size, apply, at)
    else:
        return BAD_KIND
    return VALID


cdef Py_ssize_t _walk_payload(int fmt, const uint8_t[::1] payload, const uint64_t[::1] offsets,
                              const uint8_t[::1] kinds, uint8_t[:, ::1] replica,
                              const int64_t[::1] rows, bint apply, int64_t[::1] where) noexcept nogil:
    cdef Py_ssize_t n = kinds.shape[0], size = replica.shape[1], payload_len = payload.shape[0]
    cdef Py_ssize_t i, start, slen, at = 0
    cdef int64_t row
    cdef int reason
    cdef const uint8_t *base = &payload[0] if payload_len else NULL
    for i in range(n):
        at = 0
        reason = slice_bounds(offsets, i, payload_len, &start, &slen)
        row = rows[i]
        if reason == VALID and (row < 0 or row >= replica.shape[0]):
            reason = BAD_ROW
        if reason == VALID:
            reason = walk_page(fmt, base + start, slen, kinds[i], &replica[row, 0], size, apply, &at)
        if reason != VALID:
            where[0] = <int64_t>start + at
            where[1] = reason
            return i
    return -1


def digest_decoded(int fmt, const uint8_t[::1] payload, const uint64_t[::1] offsets,
                   const uint8_t[::1] kinds, const uint8_t[:, ::1] previous, const int64_t[::1] rows,
                   uint8_t[::1] scratch, uint64_t[::1] digests, int64_t[::1] where):
    """Digest (XXH64, seed 0) every page a payload makes from ``previous[rows[i]]`` into ``digests``.

    A row of -1 stands for a zero page. Nothing is written but ``digests`` and
    ``scratch`` (one page: a DELTA is applied there onto a copy of its
    previous page and digested while in cache). Returns -1, or the index of
    the first bad page with ``where = [payload byte offset, reason]``.
    """
    cdef Py_ssize_t n = kinds.shape[0], bad_page
    if offsets.shape[0] != n + 1 or rows.shape[0] != n or digests.shape[0] != n \
            or scratch.shape[0] != previous.shape[1] or previous.shape[1] < STRIPE \
            or previous.shape[1] % STRIPE:
        raise ValueError("digest_decoded: offsets, rows, digests or scratch do not fit the payload and pages")
    with nogil:
        bad_page = _digest_decoded(fmt, payload, offsets, kinds, previous, rows, scratch, digests, where)
    return bad_page


cdef Py_ssize_t _digest_decoded(int fmt, const uint8_t[::1] payload, const uint64_t[::1] offsets,
                                const uint8_t[::1] kinds, const uint8_t[:, ::1] previous,
                                const int64_t[::1] rows, uint8_t[::1] scratch, uint64_t[::1] digests,
                                int64_t[::1] where) noexcept nogil:
    cdef Py_ssize_t n = kinds.shape[0], size = previous.shape[1], payload_len = payload.shape[0]
    cdef Py_ssize_t i, start, slen, at = 0
    cdef int64_t row
    cdef int reason
    cdef uint8_t kind
    cdef bint have_zero_digest = False
    cdef uint64_t zero_digest = 0
    cdef const uint8_t *base = &payload[0] if payload_len else NULL
    cdef uint8_t *page = &scratch[0]
    for i in range(n):
        at = 0
        reason = slice_bounds(offsets, i, payload_len, &start, &slen)
        row = rows[i]
        kind = kinds[i]
        if reason == VALID and (row < -1 or row >= previous.shape[0]):
            reason = BAD_ROW
        if reason == VALID and kind == KIND_DELTA:
            if row < 0:
                memset(page, 0, size)
            else:
                memcpy(page, &previous[row, 0], size)
        if reason == VALID:
            reason = walk_page(fmt, base + start, slen, kind, page, size, kind == KIND_DELTA, &at)
        if reason != VALID:
            where[0] = <int64_t>start + at
            where[1] = reason
            return i
        if kind == KIND_DELTA:
            digests[i] = xxh64_page(page, size)
        elif kind == KIND_FULL or kind == KIND_RAW:
            digests[i] = xxh64_page(base + start, size)
        elif kind == KIND_UNCHANGED and row >= 0:
            digests[i] = xxh64_page(&previous[row, 0], size)
        else:   # ZERO, or UNCHANGED from a zero page
            if not have_zero_digest:
                memset(page, 0, size)
                zero_digest = xxh64_page(page, size)
                have_zero_digest = True
            digests[i] = zero_digest
    return -1
