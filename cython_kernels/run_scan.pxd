# Shared inline helpers of the page kernels: zero tests, finding changed byte
# spans between two pages, ULEB128, and the reasons a payload is rejected.
# Everything is ``noexcept nogil`` over raw pointers whose lengths the callers
# checked; pages are a multiple of 64 bytes.
from libc.stdint cimport uint8_t, uint64_t

cdef extern from *:
    """
    static inline int pagepipe_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline unsigned long long pagepipe_load64(const unsigned char *p) {
        unsigned long long v; __builtin_memcpy(&v, p, 8); return v;
    }
    /* Copy n bytes between non-overlapping buffers, writing only [dst, dst + n):
       short runs (the common case) with a few overlapping word moves, no call. */
    static inline void pagepipe_copy_run(unsigned char *dst, const unsigned char *src, Py_ssize_t n) {
        if (n > 64) { __builtin_memcpy(dst, src, n); return; }
        if (n >= 8) {
            unsigned long long head, tail;
            Py_ssize_t i;
            for (i = 0; i + 8 < n; i += 8) { __builtin_memcpy(&head, src + i, 8); __builtin_memcpy(dst + i, &head, 8); }
            __builtin_memcpy(&tail, src + n - 8, 8); __builtin_memcpy(dst + n - 8, &tail, 8);
        } else if (n >= 4) {
            unsigned int head, tail;
            __builtin_memcpy(&head, src, 4); __builtin_memcpy(&tail, src + n - 4, 4);
            __builtin_memcpy(dst, &head, 4); __builtin_memcpy(dst + n - 4, &tail, 4);
        } else if (n > 0) {
            dst[0] = src[0]; dst[n - 1] = src[n - 1]; dst[n / 2] = src[n / 2];
        }
    }
    /* Copy at least n bytes, whole 16-byte chunks: dst needs 15 bytes of slack; src must stay readable. */
    static inline void pagepipe_copy_chunks(unsigned char *dst, const unsigned char *src, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i += 16) __builtin_memcpy(dst + i, src + i, 16);
    }
    static inline void pagepipe_copy_block(unsigned char *dst, const unsigned char *src) {
        __builtin_memcpy(dst, src, 64);
    }
    /* Bit k set iff byte k of the 64-byte blocks at p and q differs. */
    #ifdef __SSE2__
    #include <emmintrin.h>
    static inline unsigned long long pagepipe_diff_mask64(const unsigned char *p, const unsigned char *q) {
        unsigned long long e0 = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(
            _mm_loadu_si128((const __m128i *)p), _mm_loadu_si128((const __m128i *)q)));
        unsigned long long e1 = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(
            _mm_loadu_si128((const __m128i *)(p + 16)), _mm_loadu_si128((const __m128i *)(q + 16))));
        unsigned long long e2 = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(
            _mm_loadu_si128((const __m128i *)(p + 32)), _mm_loadu_si128((const __m128i *)(q + 32))));
        unsigned long long e3 = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(
            _mm_loadu_si128((const __m128i *)(p + 48)), _mm_loadu_si128((const __m128i *)(q + 48))));
        return ~(e0 | (e1 << 16) | (e2 << 32) | (e3 << 48));
    }
    /* 1 iff the 128-byte blocks at p and q are equal (the fast path over unchanged memory). */
    static inline int pagepipe_equal128(const unsigned char *p, const unsigned char *q) {
        __m128i x = _mm_setzero_si128();
        for (int k = 0; k < 128; k += 16)
            x = _mm_or_si128(x, _mm_xor_si128(_mm_loadu_si128((const __m128i *)(p + k)),
                                              _mm_loadu_si128((const __m128i *)(q + k))));
        return _mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_setzero_si128())) == 0xFFFF;
    }
    #else
    static inline unsigned long long pagepipe_nonzero_bytes(unsigned long long x) {
        x |= x >> 4; x |= x >> 2; x |= x >> 1;
        return ((x & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56;
    }
    static inline unsigned long long pagepipe_diff_mask64(const unsigned char *p, const unsigned char *q) {
        unsigned long long mask = 0;
        for (int k = 0; k < 8; k++)
            mask |= pagepipe_nonzero_bytes(pagepipe_load64(p + 8 * k) ^ pagepipe_load64(q + 8 * k)) << (8 * k);
        return mask;
    }
    static inline int pagepipe_equal128(const unsigned char *p, const unsigned char *q) {
        return __builtin_memcmp(p, q, 128) == 0;
    }
    #endif
    """
    int ctz64 "pagepipe_ctz64"(unsigned long long x) noexcept nogil
    uint64_t load64 "pagepipe_load64"(const uint8_t *p) noexcept nogil
    void copy_run "pagepipe_copy_run"(uint8_t *dst, const uint8_t *src, Py_ssize_t n) noexcept nogil
    uint64_t diff_mask64 "pagepipe_diff_mask64"(const uint8_t *p, const uint8_t *q) noexcept nogil
    bint equal128 "pagepipe_equal128"(const uint8_t *p, const uint8_t *q) noexcept nogil
    void copy_chunks "pagepipe_copy_chunks"(uint8_t *dst, const uint8_t *src, Py_ssize_t n) noexcept nogil
    void copy_block "pagepipe_copy_block"(uint8_t *dst, const uint8_t *src) noexcept nogil

cdef enum:
    BLOCK = 64
    COPY_SLACK = 16     # payload bytes an encoder may write past its last run (copy_chunks)

# Why a payload was rejected (0 = valid); page_codecs.REASONS describes each.
cdef enum Reason:
    VALID = 0
    BAD_OFFSETS = 1
    BAD_KIND = 2
    BAD_SLICE_LENGTH = 3
    EMPTY_DELTA = 4
    TRUNCATED = 5
    OVERRUN = 6
    BAD_RUN = 7
    TRAILING = 8
    BAD_ROW = 9


cdef struct SpanScanner:
    const uint8_t *cur      # new page
    uint8_t *cache          # cached page: each differing block is copied from ``cur`` once scanned
    Py_ssize_t size         # page size in bytes (multiple of 64)
    Py_ssize_t next_block   # byte offset of the next 64-byte block to load
    Py_ssize_t base         # byte offset of the block described by ``mask``
    uint64_t mask           # bit k set = byte base+k differs and is not yet reported
    Py_ssize_t max_gap      # runs carry equal gaps up to this long: 0 or 2
    bint has_ahead          # a span was read ahead of the run being built
    Py_ssize_t ahead_start
    Py_ssize_t ahead_end


cdef inline bint is_zero_page(const uint8_t *p, Py_ssize_t size) noexcept nogil:
    """True if all ``size`` bytes are zero (checked 64 bytes at a time)."""
    cdef const uint8_t *end = p + size
    while p < end:
        if (load64(p) | load64(p + 8) | load64(p + 16) | load64(p + 24)
                | load64(p + 32) | load64(p + 40) | load64(p + 48) | load64(p + 56)):
            return False
        p += BLOCK
    return True


cdef inline bint next_span(SpanScanner *s, Py_ssize_t *start, Py_ssize_t *end) noexcept nogil:
    """Next span [start, end) of differing bytes; spans may be cut at 64-byte block edges."""
    cdef int first, length
    while s.mask == 0:
        if s.next_block >= s.size:
            return False
        if s.size - s.next_block >= 2 * BLOCK and equal128(s.cur + s.next_block, s.cache + s.next_block):
            s.next_block += 2 * BLOCK
            continue
        s.base = s.next_block
        s.next_block += BLOCK
        s.mask = diff_mask64(s.cur + s.base, s.cache + s.base)
        if s.mask:
            copy_block(s.cache + s.base, s.cur + s.base)
            if s.max_gap == 2:   # mark equal gaps of 1 or 2 bytes between changes as changed
                s.mask |= (((s.mask << 1) & (s.mask >> 1)) | ((s.mask << 1) & (s.mask >> 2))
                           | ((s.mask << 2) & (s.mask >> 1)))
    first = ctz64(s.mask)
    length = ctz64(~(s.mask >> first))  # the shifted-in top zeros bound this by 64 - first
    start[0] = s.base + first
    end[0] = s.base + first + length
    if first + length >= BLOCK:
        s.mask = 0
    else:
        s.mask &= ~((<uint64_t>1 << (first + length)) - 1)
    return True


cdef inline void scanner_init(SpanScanner *s, const uint8_t *cur, uint8_t *cache,
                              Py_ssize_t size, Py_ssize_t max_gap) noexcept nogil:
    """Start scanning ``cur`` against ``cache``; runs will carry equal gaps of up to ``max_gap`` (0 or 2) bytes."""
    s.cur = cur
    s.cache = cache
    s.max_gap = max_gap
    s.size = size
    s.next_block = 0
    s.base = 0
    s.mask = 0
    s.has_ahead = next_span(s, &s.ahead_start, &s.ahead_end)


cdef inline bint next_run(SpanScanner *s, Py_ssize_t *start, Py_ssize_t *end) noexcept nogil:
    """Next run [start, end) of changed bytes, joining spans at most ``s.max_gap`` equal bytes apart."""
    if not s.has_ahead:
        return False
    start[0] = s.ahead_start
    end[0] = s.ahead_end
    while True:
        s.has_ahead = next_span(s, &s.ahead_start, &s.ahead_end)
        if s.has_ahead and s.ahead_start - end[0] <= s.max_gap:
            end[0] = s.ahead_end
        else:
            return True


cdef inline void copy_payload(uint8_t *dst, const uint8_t *page, Py_ssize_t start, Py_ssize_t length,
                              Py_ssize_t size) noexcept nogil:
    """Copy page[start:start + length] to ``dst`` (which has COPY_SLACK bytes of room after it)."""
    if size - start >= length + COPY_SLACK:
        copy_chunks(dst, page + start, length)
    else:
        copy_run(dst, page + start, length)


cdef inline Py_ssize_t take_literal(const uint8_t *src, Py_ssize_t slen, Py_ssize_t i, uint8_t *dst,
                                    Py_ssize_t length, bint apply) noexcept nogil:
    """The offset after the ``length`` new bytes at ``src[i]`` of a DELTA slice of ``slen`` bytes, which are
    copied to ``dst`` if ``apply``; -1 when fewer remain (the slice is truncated at ``i``)."""
    if length > slen - i:
        return -1
    if apply:
        copy_run(dst, src + i, length)
    return i + length


cdef inline int uleb_write(uint8_t *dst, Py_ssize_t value) noexcept nogil:
    """Write ``value`` (< 2**21) as ULEB128; return the bytes written."""
    if value < 0x80:
        dst[0] = <uint8_t>value
        return 1
    dst[0] = <uint8_t>((value & 0x7F) | 0x80)
    if value < 0x4000:
        dst[1] = <uint8_t>(value >> 7)
        return 2
    dst[1] = <uint8_t>(((value >> 7) & 0x7F) | 0x80)
    dst[2] = <uint8_t>(value >> 14)
    return 3


cdef inline int uleb_size(Py_ssize_t value) noexcept nogil:
    return 1 if value < 0x80 else (2 if value < 0x4000 else 3)


cdef inline int uleb_read(const uint8_t *src, Py_ssize_t available, int max_bytes,
                          Py_ssize_t *value) noexcept nogil:
    """Read a ULEB128 of at most ``max_bytes`` bytes; return bytes read, 0 if truncated, -1 if too long."""
    cdef Py_ssize_t result = 0
    cdef int i
    for i in range(max_bytes):
        if i >= available:
            return 0
        result |= <Py_ssize_t>(src[i] & 0x7F) << (7 * i)
        if not (src[i] & 0x80):
            value[0] = result
            return i + 1
    return -1
