# XXH64 (seed 0) of whole pages, shared by the page kernels (pages.pyx digests pages,
# page_codecs.pyx digests pages it reconstructs). Spec:
# https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md
from libc.stdint cimport uint8_t, uint64_t

from cython_kernels.run_scan cimport load64

cdef extern from *:
    """
    #define PAGEPIPE_XXH_PRIME1 11400714785074694791ULL
    #define PAGEPIPE_XXH_PRIME2 14029467366897019727ULL
    #define PAGEPIPE_XXH_PRIME3 1609587929392839161ULL
    #define PAGEPIPE_XXH_PRIME4 9650029242287828579ULL
    """
    const uint64_t PRIME1 "PAGEPIPE_XXH_PRIME1"
    const uint64_t PRIME2 "PAGEPIPE_XXH_PRIME2"
    const uint64_t PRIME3 "PAGEPIPE_XXH_PRIME3"
    const uint64_t PRIME4 "PAGEPIPE_XXH_PRIME4"

cdef enum:
    STRIPE = 32


cdef inline uint64_t rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t xxh_round(uint64_t acc, uint64_t lane) noexcept nogil:
    acc += lane * PRIME2
    return rotl(acc, 31) * PRIME1


cdef inline uint64_t xxh_merge(uint64_t h, uint64_t acc) noexcept nogil:
    h ^= xxh_round(0, acc)
    return h * PRIME1 + PRIME4


cdef inline uint64_t xxh64_page(const uint8_t *p, Py_ssize_t size) noexcept nogil:
    """XXH64 with seed 0 of ``size`` bytes, ``size`` a multiple of 32 (so no tail)."""
    cdef uint64_t v1 = PRIME1 + PRIME2, v2 = PRIME2, v3 = 0, v4 = <uint64_t>0 - PRIME1, h
    cdef const uint8_t *end = p + size
    while p < end:
        v1 = xxh_round(v1, load64(p))
        v2 = xxh_round(v2, load64(p + 8))
        v3 = xxh_round(v3, load64(p + 16))
        v4 = xxh_round(v4, load64(p + 24))
        p += STRIPE
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)
    h = xxh_merge(xxh_merge(xxh_merge(xxh_merge(h, v1), v2), v3), v4)
    h += <uint64_t>size
    h ^= h >> 33
    h *= PRIME2
    h ^= h >> 29
    h *= PRIME3
    h ^= h >> 32
    return h
