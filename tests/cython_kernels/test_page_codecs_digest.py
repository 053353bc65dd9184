"""digest_decoded: the digests of the pages a payload makes, equal to decode + digest_pages, writing nothing."""
from __future__ import annotations

import numpy as np
import pytest

from stages.bench.realmemory import find_corpus
from cython_kernels import page_codecs
from pipeline.batch import PageKind
from pipeline.errors import CorruptData
from stages.codecs import Encoded, get_codec
from stages.common.pages import digest_pages

PAGE = 4096
FORMATS = ["native", "xbzrle", "xen"]


def changed_pages(seed: int, npages: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """(old, new): random pages and a mix of small edits, dense rewrites, unchanged and zeroed pages."""
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, (npages, PAGE), dtype=np.uint8)
    old[3] = 0
    new = old.copy()
    for row in range(npages):
        for _ in range(int(rng.integers(0, 6))):
            start = int(rng.integers(0, PAGE - 200))
            new[row, start:start + int(rng.integers(1, 200))] = rng.integers(0, 256, dtype=np.uint8)
    new[1] = rng.integers(0, 256, PAGE, dtype=np.uint8)   # rewritten: FULL
    new[2] = 0                                              # zeroed: ZERO (native) or a long delta
    new[4] = old[4]                                         # unchanged
    return old, new


def decoded_then_digested(codec, encoding: Encoded, previous: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The reference: decode onto copies of the previous pages (zeros for row -1), then digest them."""
    pages = np.where((rows >= 0)[:, None], previous[np.maximum(rows, 0)], 0).astype(np.uint8)
    codec.decode(encoding, pages)
    return digest_pages(pages)


@pytest.mark.parametrize("name", FORMATS)
def test_digests_equal_decode_then_digest_on_random_pages(name):
    codec = get_codec(name)
    old, new = changed_pages(seed=len(name))
    encoding = codec.encode(new, old.copy())
    expected_kinds = {PageKind.DELTA, PageKind.UNCHANGED} | ({PageKind.FULL} if name != "xen" else set())
    assert expected_kinds <= set(encoding.kinds.tolist())   # Xen sends even a rewritten page as runs
    previous = old[::-1].copy()                     # the previous pages live at other rows
    rows = np.arange(old.shape[0], dtype=np.int64)[::-1].copy()
    before = previous.copy()

    digests = codec.digest_decoded(encoding, previous, rows)

    np.testing.assert_array_equal(digests, digest_pages(new))
    np.testing.assert_array_equal(digests, decoded_then_digested(codec, encoding, previous, rows))
    np.testing.assert_array_equal(previous, before)


@pytest.mark.parametrize("name", FORMATS)
def test_row_minus_one_starts_from_a_zero_page(name):
    codec = get_codec(name)
    zeros = np.zeros((3, PAGE), dtype=np.uint8)
    new = zeros.copy()
    new[0, 100:110] = 7        # DELTA from zeros
    new[2, :] = 9              # FULL (or a long delta)
    encoding = codec.encode(new, zeros.copy())
    rows = np.full(3, -1, dtype=np.int64)
    previous = np.full((1, PAGE), 0xEE, dtype=np.uint8)   # must not be read for row -1

    np.testing.assert_array_equal(codec.digest_decoded(encoding, previous, rows), digest_pages(new))


def test_digests_of_recorded_memcached_pages_equal_decode_then_digest():
    corpus = find_corpus()
    if corpus is None:
        pytest.skip("no recorded memory corpus")
    with np.load(corpus) as trace:
        base, page_numbers, data = trace["base"], trace["epoch003_pages"], trace["epoch003_data"]
    codec = get_codec("native")
    rows = page_numbers.astype(np.int64)
    encoding = codec.encode(data, base[rows].copy())
    assert (encoding.kinds == PageKind.DELTA).any()
    image = base.copy()
    image.flags.writeable = False                     # read-only, like the memmapped replica of a reader

    digests = codec.digest_decoded(encoding, image, rows)

    np.testing.assert_array_equal(digests, digest_pages(data))
    np.testing.assert_array_equal(digests, decoded_then_digested(codec, encoding, image, rows))


def corruptions(encoding: Encoded) -> list[tuple[str, Encoded]]:
    """Damaged copies of a native encoding whose first page is a DELTA."""
    payload, offsets, kinds = encoding.payload, encoding.offsets, encoding.kinds
    first_delta_end = int(offsets[1])
    overrun = payload.copy()
    overrun[0] = 0xFF                                # skip header with continuation: runs past the page
    overrun[1] = 0x7F
    bad_kind = kinds.copy()
    bad_kind[1] = 77
    return [
        ("truncated delta", Encoded(payload[:first_delta_end - 1].copy(), np.array([0, first_delta_end - 1], np.uint64),
                                    kinds[:1].copy(), "native", first_delta_end - 1)),
        ("run past the page", Encoded(overrun, offsets, kinds, "native", encoding.raw_size)),
        ("unknown kind", Encoded(payload, offsets, bad_kind, "native", encoding.raw_size)),
        ("offsets past the payload", Encoded(payload[:-1].copy(), offsets, kinds, "native", encoding.raw_size - 1)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_corrupt_payload_is_rejected_like_decode_and_nothing_is_written(case):
    codec = get_codec("native")
    old, new = changed_pages(seed=3, npages=6)
    new[0] = old[0]
    new[0, 40:48] = 1                                 # page 0 is a small DELTA
    encoding = codec.encode(new, old.copy())
    assert encoding.kinds[0] == PageKind.DELTA
    _, damaged = corruptions(encoding)[case]
    previous = old.copy()
    rows = np.arange(damaged.kinds.shape[0], dtype=np.int64)

    with pytest.raises(CorruptData, match=r"native payload: page \d+ .* byte offset \d+") as digest_error:
        codec.digest_decoded(damaged, previous, rows)
    with pytest.raises(CorruptData) as decode_error:
        codec.decode(damaged, previous.copy(), rows)
    assert str(digest_error.value) == str(decode_error.value)
    np.testing.assert_array_equal(previous, old)


@pytest.mark.parametrize("row", [-2, 6, 2**40])
def test_rows_outside_the_previous_pages_are_rejected(row):
    codec = get_codec("native")
    old, new = changed_pages(seed=5, npages=6)
    encoding = codec.encode(new, old.copy())
    rows = np.array([0, 1, row, 3, 4, 5], dtype=np.int64)
    with pytest.raises(CorruptData, match="row outside the replica"):
        codec.digest_decoded(encoding, old, rows)


def test_uint64_rows_beyond_int64_are_rejected_not_read_as_zero_pages():
    codec = get_codec("native")
    old, new = changed_pages(seed=6, npages=6)
    encoding = codec.encode(new, old.copy())
    with pytest.raises(CorruptData, match="row outside the replica"):
        codec.digest_decoded(encoding, old, np.array([0, 1, 2, 3, 4, 2**63 + 5], dtype=np.uint64))


def test_kernel_refuses_buffers_that_do_not_fit_together():
    where = np.zeros(2, np.int64)
    payload, kinds = np.zeros(0, np.uint8), np.array([PageKind.ZERO], np.uint8)
    previous, rows = np.zeros((1, PAGE), np.uint8), np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="do not fit"):
        page_codecs.digest_decoded(page_codecs.NATIVE, payload, np.zeros(2, np.uint64), kinds, previous, rows,
                                   np.zeros(PAGE // 2, np.uint8), np.zeros(1, np.uint64), where)
    with pytest.raises(ValueError, match="do not fit"):
        page_codecs.digest_decoded(page_codecs.NATIVE, payload, np.zeros(1, np.uint64), kinds, previous, rows,
                                   np.zeros(PAGE, np.uint8), np.zeros(1, np.uint64), where)


@pytest.mark.parametrize("name", FORMATS)
def test_prechecked_decode_applies_in_one_pass_what_decode_applies(name):
    codec = get_codec(name)
    old, new = changed_pages(seed=8)
    encoding = codec.encode(new, old.copy())
    codec.digest_decoded(encoding, old, np.arange(old.shape[0]))
    replica = old.copy()
    codec.decode(encoding, replica, prechecked=True)
    np.testing.assert_array_equal(replica, new)
