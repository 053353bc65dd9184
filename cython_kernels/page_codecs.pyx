"""Batch kernels of the page run formats: encode pages against cached copies, check and apply payloads.

Private: call them through ``stages.codecs``, which validates dtypes, shapes,
slots and rows first. Formats are chosen by number (NATIVE, XBZRLE, XEN); the
per-page loops live in ``native_format.pxd``, ``xbzrle_format.pxd`` and
``xen_format.pxd``. Errors are returned, never raised: a page index plus
``where = [payload byte offset, reason]``.
"""
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

from cython_kernels.native_format cimport native_encode_page, native_walk_page
from cython_kernels.run_scan cimport (
    BAD_KIND, BAD_OFFSETS, BAD_ROW, BAD_SLICE_LENGTH, COPY_SLACK, VALID, is_zero_page,
)
from cython_kernels.xbzrle_format cimport xbzrle_encode_page, xbzrle_walk_page
from cython_kernels.xen_format cimport XEN_OVERHEAD, xen_encode_page, xen_walk_page

cdef enum Format:
    FORMAT_NATIVE = 0
    FORMAT_XBZRLE = 1
    FORMAT_XEN = 2

NATIVE = FORMAT_NATIVE
XBZRLE = FORMAT_XBZRLE
XEN = FORMAT_XEN

# Page kinds: the values of pipeline.batch.PageKind (kernels import nothing of ours).
cdef enum:
    KIND_ZERO = 1
    KIND_RAW = 2
    KIND_FULL = 3
    KIND_DELTA = 4
    KIND_UNCHANGED = 5
    ZERO_CHECK_SHIFT = 4  # DELTAs longer than page_size >> 4 are checked for "now all zero"

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
    return page_size + XEN_OVERHEAD if fmt == FORMAT_XEN else page_size


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
    cdef const uint8_t *page
    cdef uint8_t *cache
    cdef uint8_t *out = &payload[0] if capacity else NULL
    for i in range(n):
        slot = slots[i]
        if slot < 0 or slot >= cached.shape[0] or capacity - d < room + COPY_SLACK:
            return -1
        page = &current[i, 0]
        cache = &cached[slot, 0]
        if fmt == FORMAT_NATIVE:
            length = native_encode_page(page, cache, size, out + d)
        elif fmt == FORMAT_XBZRLE:
            length = xbzrle_encode_page(page, cache, size, out + d)
        else:
            length = xen_encode_page(page, cache, size, out + d)
        if length < 0:
            memcpy(out + d, page, size)
            memcpy(cache, page, size)
            kind, length = KIND_FULL, size
        elif length == 0 or (fmt == FORMAT_XEN and length == 1):
            kind = KIND_UNCHANGED
        else:
            kind = KIND_DELTA
        if (emit_zero and (kind == KIND_FULL or (kind == KIND_DELTA and length > size >> ZERO_CHECK_SHIFT))
                and is_zero_page(page, size)):
            kind, length = KIND_ZERO, 0
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


cdef Py_ssize_t _walk_payload(int fmt, const uint8_t[::1] payload, const uint64_t[::1] offsets,
                              const uint8_t[::1] kinds, uint8_t[:, ::1] replica,
                              const int64_t[::1] rows, bint apply, int64_t[::1] where) noexcept nogil:
    cdef Py_ssize_t n = kinds.shape[0], size = replica.shape[1], payload_len = payload.shape[0]
    cdef Py_ssize_t i, slen, at = 0
    cdef uint64_t start, stop
    cdef int64_t row
    cdef int reason = VALID
    cdef uint8_t kind
    cdef uint8_t unchanged_len = 1 if fmt == FORMAT_XEN else 0
    cdef const uint8_t *src
    cdef uint8_t *page
    cdef const uint8_t *base = &payload[0] if payload_len else NULL
    for i in range(n):
        start = offsets[i]
        stop = offsets[i + 1]
        if stop < start or stop > <uint64_t>payload_len or (i == 0 and start != 0):
            where[0] = <int64_t>start
            where[1] = BAD_OFFSETS
            return i
        src = base + start
        slen = <Py_ssize_t>(stop - start)
        row = rows[i]
        if row < 0 or row >= replica.shape[0]:
            where[0] = <int64_t>start
            where[1] = BAD_ROW
            return i
        page = &replica[row, 0]
        kind = kinds[i]
        at = 0
        if kind == KIND_UNCHANGED:
            if slen != unchanged_len or (unchanged_len and src[0] != 0):
                reason = BAD_SLICE_LENGTH
        elif kind == KIND_ZERO:
            if slen != 0:
                reason = BAD_SLICE_LENGTH
            elif apply:
                memset(page, 0, size)
        elif kind == KIND_FULL or kind == KIND_RAW:
            if slen != size:
                reason = BAD_SLICE_LENGTH
            elif apply:
                memcpy(page, src, size)
        elif kind == KIND_DELTA:
            if fmt == FORMAT_NATIVE:
                reason = native_walk_page(src, slen, page, size, apply, &at)
            elif fmt == FORMAT_XBZRLE:
                reason = xbzrle_walk_page(src, slen, page, size, apply, &at)
            else:
                reason = xen_walk_page(src, slen, page, size, apply, &at)
        else:
            reason = BAD_KIND
        if reason != VALID:
            where[0] = <int64_t>start + at
            where[1] = reason
            return i
    return -1
