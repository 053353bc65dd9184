"""xbzrle and xen are byte-exact with QEMU and Xen: known vectors, and reference encoders written from their specs.

The reference encoders below follow QEMU ``migration/xbzrle.c`` and Xen
``tools/libxc/xc_compression.c`` step by step, one byte or word at a time.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import PageKind
from stages.codecs import Encoded, get_codec

PAGE = 4096


def uleb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def qemu_xbzrle_encode(old: bytes, new: bytes, dlen: int = PAGE) -> bytes | None:
    """QEMU's encoder; None where it returns -1 (overflow), b"" for an unchanged page."""
    slen, i, out = len(new), 0, bytearray()
    while i < slen:
        if len(out) + 2 > dlen:
            return None
        zrun = 0
        while i < slen and old[i] == new[i]:
            i, zrun = i + 1, zrun + 1
        if zrun == slen:
            return b""
        if i == slen:
            return bytes(out)
        out += uleb128(zrun)
        if len(out) + 2 > dlen:
            return None
        start = i
        while i < slen and old[i] != new[i]:
            i += 1
        out += uleb128(i - start)
        if len(out) + (i - start) > dlen:
            return None
        out += new[start:i]
    return bytes(out)


def xen_compress_page(old: bytes, new: bytes) -> bytes:
    """Xen's compress_page: 32-bit words, runs of at most 127, trailing skip run written."""
    old_words = np.frombuffer(old, dtype="<u4")
    new_words = np.frombuffer(new, dtype="<u4")
    out, run_start, run_length, was_copying, skipped = bytearray(), 0, 0, False, 0
    for offset in range(len(new_words) + 1):
        copying = bool(old_words[offset] != new_words[offset]) if offset < len(new_words) else not was_copying
        if run_length and (was_copying != copying or run_length == 127):
            if was_copying:
                out.append(run_length)
                out += new[4 * run_start: 4 * (run_start + run_length)]
            else:
                out.append(0x80 | run_length)
                skipped += 4 * run_length
            run_length, run_start = 0, offset
        run_length += 1
        was_copying = copying
    return b"\x00" if skipped == len(new) else bytes(out)


def encode_one(name: str, old: np.ndarray, new: np.ndarray) -> tuple[PageKind, bytes, np.ndarray]:
    cache = old.reshape(1, PAGE).copy()
    codec = get_codec(name)
    encoded = codec.encode(new.reshape(1, PAGE), cache)
    return PageKind(encoded.kinds[0]), codec.system_bytes(encoded, 0), cache


def test_xbzrle_last_byte_vector():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    new[4095] = 1
    kind, data, _ = encode_one("xbzrle", old, new)
    assert (kind, data) == (PageKind.DELTA, bytes.fromhex("ff1f0101"))


def test_xbzrle_every_even_byte_overflows_and_is_sent_whole():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    new[::2] = 1
    kind, data, cache = encode_one("xbzrle", old, new)
    assert kind == PageKind.FULL and data == new.tobytes()
    assert np.array_equal(cache[0], new)


def test_xbzrle_unchanged_page_is_empty():
    page = np.arange(PAGE, dtype=np.uint32).astype(np.uint8)
    assert encode_one("xbzrle", page, page) == (PageKind.UNCHANGED, b"", pytest.approx(page.reshape(1, PAGE)))


def test_xbzrle_encoding_of_exactly_the_page_size_is_kept_as_qemu_does():
    """Unchanged pairs then 127 changed bytes, ending at the page end: QEMU's checks allow exactly 4096 bytes."""
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    position = 0
    while position + 2 + 127 <= PAGE:
        position += 2
        new[position: position + 127] = 1
        position += 127
    new[PAGE - 1] = 1   # make the tail end with a changed byte
    expected = qemu_xbzrle_encode(old.tobytes(), new.tobytes())
    kind, data, _ = encode_one("xbzrle", old, new)
    assert data == (expected if expected is not None else new.tobytes())
    assert kind == (PageKind.FULL if expected is None else PageKind.DELTA)


def test_xen_unchanged_page_is_one_zero_byte():
    page = np.arange(PAGE, dtype=np.uint32).astype(np.uint8)
    kind, data, _ = encode_one("xen", page, page)
    assert (kind, data) == (PageKind.UNCHANGED, b"\x00")


def test_xen_page_with_every_word_changed_takes_4105_bytes():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = np.full(PAGE, 7, dtype=np.uint8)
    kind, data, _ = encode_one("xen", old, new)
    assert kind == PageKind.DELTA and len(data) == 4105
    assert data[0] == 127 and data[509] == 127 and data[-33] == 8


def test_xen_one_changed_word():
    old = np.zeros(PAGE, dtype=np.uint8)
    new = old.copy()
    new[4:8] = [1, 2, 3, 4]
    _, data, _ = encode_one("xen", old, new)
    # skip 1 word, copy 1 word, then 1022 unchanged words as 8 runs of 127 and one of 6
    assert data == bytes([0x81, 0x01, 1, 2, 3, 4]) + bytes([0x80 | 127] * 8) + bytes([0x80 | 6])


def test_xen_full_page_system_bytes_are_0x80_then_the_page():
    page = np.arange(PAGE, dtype=np.uint32).astype(np.uint8)
    encoded = Encoded(payload=page, offsets=np.array([0, PAGE], dtype=np.uint64),
                      kinds=np.array([PageKind.FULL], dtype=np.uint8), codec="xen", raw_size=PAGE)
    data = get_codec("xen").system_bytes(encoded, 0)
    assert data == b"\x80" + page.tobytes() and len(data) == 4097


@st.composite
def page_pairs(draw):
    """An old page and a new page differing in hypothesis-chosen runs of bytes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = rng.integers(0, 256, size=PAGE, dtype=np.uint8) * (rng.random(PAGE) < draw(st.sampled_from([0, 0.3, 1])))
    old = old.astype(np.uint8)
    new = old.copy()
    for start, length in draw(st.lists(st.tuples(st.integers(0, PAGE - 1), st.integers(1, 600)), max_size=40)):
        new[start: start + length] ^= np.uint8(draw(st.integers(1, 255)))
    return old, new


@settings(max_examples=60, deadline=None)
@given(pair=page_pairs())
def test_xbzrle_matches_qemu_reference(pair):
    old, new = pair
    expected = qemu_xbzrle_encode(old.tobytes(), new.tobytes())
    kind, data, cache = encode_one("xbzrle", old, new)
    if expected is None:
        assert (kind, data) == (PageKind.FULL, new.tobytes())
    else:
        assert data == expected
        assert kind == (PageKind.UNCHANGED if expected == b"" else PageKind.DELTA)
    assert np.array_equal(cache[0], new)


@settings(max_examples=60, deadline=None)
@given(pair=page_pairs())
def test_xen_matches_xen_reference(pair):
    old, new = pair
    kind, data, cache = encode_one("xen", old, new)
    assert data == xen_compress_page(old.tobytes(), new.tobytes())
    assert kind == (PageKind.UNCHANGED if data == b"\x00" else PageKind.DELTA)
    assert np.array_equal(cache[0], new)


@pytest.mark.parametrize("name", ["xbzrle", "xen", "xbzrle+zstd"])
@pytest.mark.parametrize("page_size", [512, 8192, 65536])
def test_system_formats_refuse_other_page_sizes(name, page_size):
    pages = np.zeros((1, page_size), dtype=np.uint8)
    with pytest.raises(ValueError, match="page size 4096"):
        get_codec(name).encode(pages, pages.copy())
    with pytest.raises(ValueError, match="page size 4096"):
        get_codec(name).decode(Encoded(np.zeros(0, np.uint8), np.zeros(2, np.uint64), np.array([5], np.uint8),
                                       name, 0), pages)
