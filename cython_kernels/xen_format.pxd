# Xen's 2011 Remus page encoding (tools/libxc/xc_compression.c), byte for
# byte: the page as little-endian 32-bit words; a header byte holds a word
# count 1..127, top bit set = skip that many unchanged words, clear = copy the
# new words that follow. Runs are cut at 127 words; the trailing skip run is
# written too; an unchanged page is the single byte 0x00.
from libc.stdint cimport uint8_t

from cython_kernels.run_scan cimport (
    BAD_RUN, EMPTY_DELTA, OVERRUN, TRAILING, TRUNCATED, VALID, SpanScanner, copy_payload, copy_run, next_run,
    scanner_init,
)

cdef enum:
    XEN_SKIP = 0x80
    XEN_MAX_WORDS = 127
    XEN_OVERHEAD = 16         # worst case is page + 9 header bytes (every word changed)


cdef inline Py_ssize_t xen_skip_runs(uint8_t *dst, Py_ssize_t words) noexcept nogil:
    """Write skip runs covering ``words`` unchanged words; return the bytes written."""
    cdef Py_ssize_t d = 0, count
    while words > 0:
        count = words if words < XEN_MAX_WORDS else XEN_MAX_WORDS
        dst[d] = <uint8_t>(XEN_SKIP | count)
        d += 1
        words -= count
    return d


cdef inline Py_ssize_t xen_encode_page(const uint8_t *cur, uint8_t *cache, Py_ssize_t size,
                                       uint8_t *dst) noexcept nogil:
    """Encode one page into ``dst`` (room: ``size`` + XEN_OVERHEAD + COPY_SLACK), updating ``cache``; return its length.

    Changed byte runs are widened to whole words; runs touching the same or
    adjacent words form one copy run, as Xen's word-by-word loop would.
    """
    cdef SpanScanner scan
    cdef Py_ssize_t d = 0, start, end, first_word, end_word, previous_end_word = 0, count
    cdef bint more
    scanner_init(&scan, cur, cache, size, 0)
    more = next_run(&scan, &start, &end)
    if not more:
        dst[0] = 0
        return 1
    while more:
        first_word = start // 4
        end_word = (end + 3) // 4
        more = next_run(&scan, &start, &end)
        while more and start // 4 <= end_word:
            end_word = (end + 3) // 4
            more = next_run(&scan, &start, &end)
        d += xen_skip_runs(dst + d, first_word - previous_end_word)
        while first_word < end_word:
            count = end_word - first_word
            if count > XEN_MAX_WORDS:
                count = XEN_MAX_WORDS
            dst[d] = <uint8_t>count
            copy_payload(dst + d + 1, cur, 4 * first_word, 4 * count, size)
            d += 1 + 4 * count
            first_word += count
        previous_end_word = end_word
    return d + xen_skip_runs(dst + d, size // 4 - previous_end_word)


cdef inline int xen_walk_page(const uint8_t *src, Py_ssize_t slen, uint8_t *page,
                              Py_ssize_t size, bint apply, Py_ssize_t *where) noexcept nogil:
    """Check (and if ``apply``, apply) one DELTA slice with Xen's decoder rules."""
    cdef Py_ssize_t i = 0, position = 0, length
    if slen == 0:
        where[0] = 0
        return EMPTY_DELTA
    while position < size:
        if i >= slen:
            where[0] = i
            return TRUNCATED
        length = 4 * (src[i] & XEN_MAX_WORDS)
        if length == 0:
            where[0] = i
            return BAD_RUN
        if length > size - position:
            where[0] = i
            return OVERRUN
        i += 1
        if not (src[i - 1] & XEN_SKIP):
            # run_scan.take_literal, written out: through it this loop decoded 2.5% slower (measured)
            if length > slen - i:
                where[0] = i
                return TRUNCATED
            if apply:
                copy_run(page + position, src + i, length)
            i += length
        position += length
    if i != slen:
        where[0] = i
        return TRAILING
    return VALID
