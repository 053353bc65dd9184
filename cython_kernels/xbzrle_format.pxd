# QEMU's XBZRLE page encoding (migration/xbzrle.c), byte for byte: runs of
# ULEB128(unchanged length) then ULEB128(changed length) and the new bytes;
# lengths of at most 14 bits; no trailing unchanged run. The overflow rule is
# QEMU's, checked at the same points with the destination size = page size.
from libc.stdint cimport uint8_t

from cython_kernels.run_scan cimport (
    BAD_RUN, EMPTY_DELTA, OVERRUN, TRAILING, TRUNCATED, VALID, SpanScanner, copy_payload, next_run, scanner_init,
    take_literal, uleb_read, uleb_write,
)

cdef enum:
    XBZRLE_MAX_VARINT = 2     # QEMU's uleb128_*_small: 14-bit lengths


cdef inline Py_ssize_t xbzrle_encode_page(const uint8_t *cur, uint8_t *cache, Py_ssize_t size,
                                          uint8_t *dst) noexcept nogil:
    """Encode one page into ``dst`` (room: ``size`` + COPY_SLACK bytes), updating ``cache``.

    Returns the encoding length (0: unchanged) or -1 where QEMU reports overflow.
    """
    cdef SpanScanner scan
    cdef Py_ssize_t d = 0, previous_end = 0, start, end, length
    scanner_init(&scan, cur, cache, size, 0)
    while next_run(&scan, &start, &end):
        length = end - start
        if d + 2 > size:
            return -1
        d += uleb_write(dst + d, start - previous_end)
        if d + 2 > size:
            return -1
        d += uleb_write(dst + d, length)
        if d + length > size:
            return -1
        copy_payload(dst + d, cur, start, length, size)
        d += length
        previous_end = end
    if d and previous_end < size and d + 2 > size:
        return -1   # QEMU checks room before scanning the trailing unchanged run
    return d


cdef inline int xbzrle_walk_page(const uint8_t *src, Py_ssize_t slen, uint8_t *page,
                                 Py_ssize_t size, bint apply, Py_ssize_t *where) noexcept nogil:
    """Check (and if ``apply``, apply) one DELTA slice with QEMU's decoder rules."""
    cdef Py_ssize_t i = 0, position = 0, count, after
    cdef int n
    if slen == 0:
        where[0] = 0
        return EMPTY_DELTA
    if slen > size:
        where[0] = size
        return TRAILING
    while i < slen:
        if slen - i < 2:
            where[0] = i
            return TRUNCATED
        n = uleb_read(src + i, slen - i, XBZRLE_MAX_VARINT, &count)
        if n < 0 or (i and not count):
            where[0] = i
            return BAD_RUN
        if count > size - position:
            where[0] = i
            return OVERRUN
        i += n
        position += count
        if slen - i < 2:
            where[0] = i
            return TRUNCATED
        n = uleb_read(src + i, slen - i, XBZRLE_MAX_VARINT, &count)
        if n < 0 or not count:
            where[0] = i
            return BAD_RUN
        if count > size - position:
            where[0] = i
            return OVERRUN
        i += n
        after = take_literal(src, slen, i, page + position, count, apply)
        if after < 0:
            where[0] = i
            return TRUNCATED
        i = after
        position += count
    return VALID
