"""zstd and lz4 entropy codecs: exact round trips, bounded and checked decompression."""
from __future__ import annotations

import numpy as np
import pytest
import zstandard

from pipeline.errors import CorruptData
from stages.codecs import get_codec

DATA = np.frombuffer(b"pagepipe " * 1000 + bytes(5000), dtype=np.uint8)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
@pytest.mark.parametrize("data", [DATA, DATA[:0], DATA[:1]])
def test_round_trip(name, data):
    codec = get_codec(name)
    compressed = codec.compress(data)
    assert compressed.dtype == np.uint8 and compressed.ndim == 1
    assert np.array_equal(codec.decompress(compressed, data.shape[0]), data)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_compresses_repetitive_payloads(name):
    assert get_codec(name).compress(DATA).shape[0] < DATA.shape[0] // 10


def test_zstd_level_changes_the_output_not_the_data():
    fast, strong = get_codec("zstd", level=1), get_codec("zstd", level=19)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4, size=50000, dtype=np.uint8)
    assert strong.compress(data).shape[0] < fast.compress(data).shape[0]
    assert np.array_equal(fast.decompress(strong.compress(data), data.shape[0]), data)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
@pytest.mark.parametrize("raw_size_change", [-1, 1, 10**6])
def test_wrong_raw_size_is_corrupt(name, raw_size_change):
    codec = get_codec(name)
    with pytest.raises(CorruptData):
        codec.decompress(codec.compress(DATA), DATA.shape[0] + raw_size_change)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_garbage_and_truncation_are_corrupt(name):
    codec = get_codec(name)
    compressed = codec.compress(DATA)
    for bad in (compressed[: compressed.shape[0] // 2], np.full(100, 0xAB, np.uint8), compressed[:0]):
        with pytest.raises(CorruptData):
            codec.decompress(bad, DATA.shape[0])


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocating():
    huge = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    with pytest.raises(CorruptData, match="declares"):
        get_codec("zstd").decompress(np.frombuffer(huge, np.uint8), 100)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_negative_raw_size_is_corrupt(name):
    with pytest.raises(CorruptData, match="byte count"):
        get_codec(name).decompress(DATA, -5)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
@pytest.mark.parametrize("trailer", [b"\x00", b"xyz", b"\x28\xb5\x2f\xfd" + bytes(16)])
def test_bytes_after_the_compressed_data_are_corrupt(name, trailer):
    """Nothing may hide after the frame or block: the payload is all compressed data."""
    codec = get_codec(name)
    padded = np.concatenate([codec.compress(DATA), np.frombuffer(trailer, np.uint8)])
    with pytest.raises(CorruptData):
        codec.decompress(padded, DATA.shape[0])
