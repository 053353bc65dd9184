"""Batch kernels over whole pages: zero-page detection and XXH64 page digests.

Private: call them through ``stages.pages``, which validates the arrays.
"""
from libc.stdint cimport uint8_t, uint64_t

from cython_kernels.run_scan cimport is_zero_page
from cython_kernels.xxh64 cimport xxh64_page


def find_zero_pages(const uint8_t[:, ::1] pages, uint8_t[::1] out) -> None:
    """out[i] = 1 if page i is all zeros, else 0."""
    cdef Py_ssize_t i, size = pages.shape[1]
    with nogil:
        for i in range(pages.shape[0]):
            out[i] = is_zero_page(&pages[i, 0], size)


def digest_pages(const uint8_t[:, ::1] pages, uint64_t[::1] out) -> None:
    """out[i] = XXH64(seed 0) of page i."""
    cdef Py_ssize_t i, size = pages.shape[1]
    with nogil:
        for i in range(pages.shape[0]):
            out[i] = xxh64_page(&pages[i, 0], size)
