# The native run format (docs/FORMAT.md, "native"): runs of ULEB128(skip),
# ULEB128(length - 1), then ``length`` new bytes; equal gaps of at most
# NATIVE_MAX_GAP bytes are carried inside a run because a new run header
# would cost as much.
from libc.stdint cimport uint8_t

from cython_kernels.run_scan cimport (
    BAD_RUN, EMPTY_DELTA, OVERRUN, TRUNCATED, VALID, SpanScanner, copy_payload, next_run, scanner_init, take_literal,
    uleb_read, uleb_size, uleb_write,
)

cdef enum:
    NATIVE_MAX_GAP = 2
    NATIVE_MAX_VARINT = 3     # page sizes up to 65536 need 17 bits


cdef inline Py_ssize_t native_encode_page(const uint8_t *cur, uint8_t *cache, Py_ssize_t size,
                                          uint8_t *dst) noexcept nogil:
    """Encode one page into ``dst`` (room: ``size`` + COPY_SLACK bytes), updating ``cache``.

    Returns the encoding length (0: unchanged), or -1 when it would not be
    smaller than the page (the caller sends it whole).
    """
    cdef SpanScanner scan
    cdef Py_ssize_t d = 0, previous_end = 0, start, end, length
    scanner_init(&scan, cur, cache, size, NATIVE_MAX_GAP)
    while next_run(&scan, &start, &end):
        length = end - start
        if d + uleb_size(start - previous_end) + uleb_size(length - 1) + length >= size:
            return -1
        d += uleb_write(dst + d, start - previous_end)
        d += uleb_write(dst + d, length - 1)
        copy_payload(dst + d, cur, start, length, size)
        d += length
        previous_end = end
    return d


cdef inline int native_walk_page(const uint8_t *src, Py_ssize_t slen, uint8_t *page,
                                 Py_ssize_t size, bint apply, Py_ssize_t *where) noexcept nogil:
    """Check (and if ``apply``, apply) one DELTA slice; return a Reason, ``where`` = slice offset."""
    cdef Py_ssize_t i = 0, position = 0, skip, length, run_at, after
    cdef int n
    if slen == 0:
        where[0] = 0
        return EMPTY_DELTA
    while i < slen:
        run_at = i
        n = uleb_read(src + i, slen - i, NATIVE_MAX_VARINT, &skip)
        if n <= 0:
            where[0] = i
            return TRUNCATED if n == 0 else BAD_RUN
        i += n
        n = uleb_read(src + i, slen - i, NATIVE_MAX_VARINT, &length)
        if n <= 0:
            where[0] = i
            return TRUNCATED if n == 0 else BAD_RUN
        i += n
        length += 1
        if skip > size - position or length > size - position - skip:
            where[0] = run_at
            return OVERRUN
        position += skip
        after = take_literal(src, slen, i, page + position, length, apply)
        if after < 0:
            where[0] = i
            return TRUNCATED
        i = after
        position += length
    return VALID
