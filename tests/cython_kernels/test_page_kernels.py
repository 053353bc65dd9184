"""Zero-page detection, XXH64 page digests and the order-independent set digest."""
from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cython_kernels import page_codecs
from pipeline.batch import PageKind
from stages.common.pages import check_pages, combine_digests, digest_pages, find_zero_pages

PAGE_SIZES = [1 << bits for bits in range(9, 17)]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_zero_pages_are_found_and_one_set_byte_anywhere_counts(page_size):
    pages = np.zeros((5, page_size), dtype=np.uint8)
    pages[1, 0] = 1
    pages[2, page_size - 1] = 0x80
    pages[3, page_size // 2 + 3] = 7
    assert find_zero_pages(pages).tolist() == [True, False, False, False, True]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_digest_is_xxh64_of_each_page(page_size):
    rng = np.random.default_rng(page_size)
    pages = rng.integers(0, 256, size=(3, page_size), dtype=np.uint8)
    pages[2] = 0
    digests = digest_pages(pages)
    assert digests.dtype == np.uint64
    assert [int(d) for d in digests] == [xxhash.xxh64_intdigest(page.tobytes()) for page in pages]


@settings(max_examples=50, deadline=None)
@given(position=st.integers(0, 4095), bit=st.integers(0, 7))
def test_digest_changes_with_any_single_bit(position, bit):
    pages = np.zeros((2, 4096), dtype=np.uint8)
    pages[1, position] = 1 << bit
    first, second = digest_pages(pages)
    assert first != second


def test_empty_batches():
    empty = np.empty((0, 4096), dtype=np.uint8)
    assert find_zero_pages(empty).shape == (0,)
    assert digest_pages(empty).shape == (0,)
    assert combine_digests(np.empty(0, np.uint64), np.empty(0, np.uint64)) == 0


def test_combined_digest_ignores_order_but_not_pairing():
    rng = np.random.default_rng(1)
    numbers = rng.permutation(1000)[:50].astype(np.uint64)
    digests = rng.integers(0, 2**63, size=50, dtype=np.uint64)
    combined = combine_digests(numbers, digests)
    order = rng.permutation(50)
    assert combine_digests(numbers[order], digests[order]) == combined
    assert 0 <= combined < 2**64
    swapped = digests.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert combine_digests(numbers, swapped) != combined
    assert combine_digests(numbers[1:], digests[1:]) != combined


def test_combined_digest_checks_its_arguments():
    with pytest.raises(ValueError, match="page numbers"):
        combine_digests(np.arange(3), np.arange(2))
    with pytest.raises(TypeError, match="integers"):
        combine_digests(np.arange(2.0), np.arange(2))


@pytest.mark.parametrize("bad, error", [
    (np.zeros((2, 4096), np.uint16), TypeError),
    (np.zeros(4096, np.uint8), ValueError),
    (np.zeros((2, 3000), np.uint8), ValueError),
    (np.zeros((2, 131072), np.uint8), ValueError),
    (np.zeros((4, 4096), np.uint8)[::2], ValueError),
    (b"\x00" * 4096, TypeError),
])
def test_wrappers_reject_bad_arrays(bad, error):
    for function in (find_zero_pages, digest_pages, check_pages):
        with pytest.raises(error):
            function(bad)


def test_kernel_page_kinds_are_the_batch_page_kinds():
    assert {name: int(PageKind[name]) for name in page_codecs.KINDS} == page_codecs.KINDS
