"""Batch kernels of xor-delta: look a batch up in the page cache, and (fused with rle) encode it in one pass.

Private: call them through ``stages.xor_delta``, which validates the arrays
and keeps the cache's policy (allocation, eviction, RAW pages). Errors are
returned, never raised.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

from cython_kernels.page_encode cimport (
    ENCODE_NATIVE, ENCODE_XBZRLE, ENCODE_XEN, PAGE_DELTA, PAGE_FULL, PAGE_NORMAL, PAGE_RAW, PAGE_ZERO, encode_page,
    encode_room,
)
from cython_kernels.run_scan cimport COPY_SLACK, is_zero_page

FORMATS = {"native": ENCODE_NATIVE, "xbzrle": ENCODE_XBZRLE, "xen": ENCODE_XEN}
"""Run format numbers by name (the same numbers as page_codecs.NATIVE, XBZRLE, XEN)."""


def payload_capacity(int fmt, Py_ssize_t deltas, Py_ssize_t whole, Py_ssize_t page_size):
    """Payload buffer ``encode_batch`` needs for ``deltas`` pages to encode and ``whole`` pages to copy."""
    return deltas * encode_room(fmt, page_size) + whole * page_size + COPY_SLACK


def encode_batch(int fmt, const uint8_t[:, ::1] pages, const uint8_t[::1] kinds, const int64_t[::1] slots,
                 uint8_t[:, ::1] cache, uint8_t[::1] payload, uint64_t[::1] offsets, uint8_t[::1] out_kinds,
                 int64_t[::1] order, bint emit_zero):
    """Encode a planned batch: see ``_encode_batch``. Returns the payload length, or -1 on inconsistent input."""
    cdef Py_ssize_t length
    with nogil:
        length = _encode_batch(fmt, pages, kinds, slots, cache, payload, offsets, out_kinds, order, emit_zero)
    return length


cdef Py_ssize_t _encode_batch(int fmt, const uint8_t[:, ::1] pages, const uint8_t[::1] kinds,
                              const int64_t[::1] slots, uint8_t[:, ::1] cache, uint8_t[::1] payload,
                              uint64_t[::1] offsets, uint8_t[::1] out_kinds, int64_t[::1] order,
                              bint emit_zero) noexcept nogil:
    """Page i of kind DELTA is encoded against ``cache[slots[i]]``, FULL and RAW go whole (and into their slot,
    if any), ZERO as an empty slice (zeroing its slot, if any). Output entries: the encoded pages, then the
    whole ones, then the zero ones, each in row order; ``order[j]`` is entry j's row, ``offsets`` (n + 1)
    its payload slice, ``out_kinds`` its kind (an encoded page may come out FULL, UNCHANGED or ZERO).
    """
    cdef Py_ssize_t n = pages.shape[0], size = pages.shape[1], slot_count = cache.shape[0]
    cdef Py_ssize_t capacity = payload.shape[0], room = encode_room(fmt, size) + COPY_SLACK
    cdef Py_ssize_t i, j = 0, d = 0, length, section
    cdef int64_t slot
    cdef uint8_t kind
    cdef uint8_t *out = &payload[0] if capacity else NULL
    if (kinds.shape[0] != n or slots.shape[0] != n or offsets.shape[0] != n + 1 or out_kinds.shape[0] != n
            or order.shape[0] != n or cache.shape[1] != size):
        return -1
    for section in range(3):
        for i in range(n):
            kind = kinds[i]
            slot = slots[i]
            if slot >= slot_count or (kind == PAGE_DELTA and slot < 0):
                return -1
            if section == 0 and kind == PAGE_DELTA:
                if capacity - d < room:
                    return -1
                length = encode_page(fmt, &pages[i, 0], &cache[slot, 0], size, out + d, emit_zero, &kind)
            elif section == 1 and (kind == PAGE_FULL or kind == PAGE_RAW):
                if capacity - d < size:
                    return -1
                memcpy(out + d, &pages[i, 0], size)
                if slot >= 0:
                    memcpy(&cache[slot, 0], &pages[i, 0], size)
                length = size
            elif section == 2 and kind == PAGE_ZERO:
                if slot >= 0:
                    memset(&cache[slot, 0], 0, size)
                length = 0
            else:
                continue
            order[j] = i
            offsets[j] = d
            out_kinds[j] = kind
            d += length
            j += 1
    if j != n:
        return -1  # a page of a kind this kernel does not take
    offsets[n] = d
    return d


def plan_lookup(const uint8_t[:, ::1] pages, const uint64_t[::1] numbers, const uint8_t[::1] kinds_in,
                const int32_t[::1] index, uint64_t[::1] last_used, uint64_t clock, bint find_zero,
                uint8_t[::1] kinds, int64_t[::1] slots):
    """Look a batch up in the cache's dense page-number index: see ``_plan_lookup``.

    Returns how many pages need a slot, -1 if the batch has a RAW page (or disagreeing arrays): plan it the
    general way, or -2 if a cached page's number appears twice.
    """
    cdef Py_ssize_t result
    with nogil:
        result = _plan_lookup(pages, numbers, kinds_in, index, last_used, clock, find_zero, kinds, slots)
    return result


cdef Py_ssize_t _plan_lookup(const uint8_t[:, ::1] pages, const uint64_t[::1] numbers,
                             const uint8_t[::1] kinds_in, const int32_t[::1] index, uint64_t[::1] last_used,
                             uint64_t clock, bint find_zero, uint8_t[::1] kinds,
                             int64_t[::1] slots) noexcept nogil:
    """Per page: its slot (-1: not cached), stamped with ``clock`` (used by this batch), and its outgoing kind:
    ZERO if it came ZERO (or, ``find_zero``, is all zeros), else DELTA when cached, FULL when not.
    """
    cdef Py_ssize_t n = numbers.shape[0], size = pages.shape[1], i, needs = 0
    cdef Py_ssize_t index_length = index.shape[0], slot_count = last_used.shape[0]
    cdef uint64_t number
    cdef int64_t slot
    cdef uint8_t kind
    if pages.shape[0] != n or kinds_in.shape[0] != n or kinds.shape[0] != n or slots.shape[0] != n:
        return -1
    for i in range(n):
        kind = kinds_in[i]
        if kind != PAGE_NORMAL and kind != PAGE_ZERO:
            return -1
        number = numbers[i]
        slot = index[number] if number < <uint64_t>index_length else -1
        if slot >= slot_count:
            return -1
        if slot >= 0:
            if last_used[slot] == clock:
                return -2
            last_used[slot] = clock
        else:
            needs += 1
        slots[i] = slot
        if kind == PAGE_ZERO or (find_zero and is_zero_page(&pages[i, 0], size)):
            kinds[i] = PAGE_ZERO
        else:
            kinds[i] = PAGE_DELTA if slot >= 0 else PAGE_FULL
    return needs
