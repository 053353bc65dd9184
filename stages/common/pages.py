"""Whole-page helpers: array checks, zero-page detection and page digests.

Thin wrappers over ``cython_kernels.pages``. The page digest is XXH64 (seed 0)
of the page bytes: a fast non-cryptographic 64-bit hash, equal to
``xxhash.xxh64_intdigest(page)``; it detects accidents, not attacks.
"""
from __future__ import annotations

import numpy as np

from cython_kernels import pages as _kernels

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
_MASK64 = 0xFFFFFFFFFFFFFFFF


def check_page_size(page_size: int) -> None:
    """Raise ValueError unless ``page_size`` is a power of two from 512 to 65536."""
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0):
        raise ValueError(f"page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}")


def check_pages(pages: np.ndarray, name: str = "pages", *, writable: bool = False) -> np.ndarray:
    """Check that ``pages`` is a C-contiguous ``(n, page_size)`` uint8 array; return it.

    Raises TypeError for a wrong type or dtype, ValueError for a wrong shape,
    page size, layout, or (``writable``) a read-only array.
    """
    if not isinstance(pages, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(pages).__name__}")
    if pages.dtype != np.uint8:
        raise TypeError(f"{name}: expected dtype uint8, got {pages.dtype}")
    if pages.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, page_size), got {pages.shape}")
    check_page_size(pages.shape[1])
    if not pages.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous (use np.ascontiguousarray)")
    if writable and not pages.flags.writeable:
        raise ValueError(f"{name}: array is read-only but is updated in place")
    return pages


def find_zero_pages(pages: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: which pages are entirely zero."""
    check_pages(pages)
    out = np.empty(pages.shape[0], dtype=np.uint8)
    _kernels.find_zero_pages(pages, out)
    return out.view(np.bool_)


def digest_pages(pages: np.ndarray) -> np.ndarray:
    """``(n,)`` uint64: the XXH64 (seed 0) digest of every page."""
    check_pages(pages)
    out = np.empty(pages.shape[0], dtype=np.uint64)
    _kernels.digest_pages(pages, out)
    return out


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, elementwise (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def combine_digests(page_numbers: np.ndarray, digests: np.ndarray) -> int:
    """Order-independent 64-bit digest of a set of (page number, page digest) pairs.

    The sum mod 2**64 of ``fmix64(digest ^ fmix64(page_number))`` over the
    pairs, so the same set in any order gives the same value and a page
    moved to another number changes it. An empty set digests to 0.
    """
    page_numbers = np.asarray(page_numbers)
    digests = np.asarray(digests)
    if page_numbers.ndim != 1 or page_numbers.shape != digests.shape:
        raise ValueError(f"combine_digests: {page_numbers.shape} page numbers for {digests.shape} digests")
    for name, array in (("page_numbers", page_numbers), ("digests", digests)):
        if array.size and array.dtype.kind not in "ui":
            raise TypeError(f"combine_digests: {name} must be integers, got {array.dtype}")
    with np.errstate(over="ignore"):
        mixed = _fmix64(digests.astype(np.uint64) ^ _fmix64(page_numbers.astype(np.uint64)))
        return int(mixed.sum(dtype=np.uint64)) & _MASK64
