"""get_codec / list_codecs: names, chains, options, configs, and clear errors for wrong arguments."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError, CorruptData
from stages.codecs import ChainCodec, EntropyCodec, PageCodec, get_codec, list_codecs


def test_list_codecs_names_run_formats_entropy_coders_and_chains():
    names = list_codecs()
    assert names[:5] == ["native", "xbzrle", "xen", "zstd", "lz4"]
    assert {"native+zstd", "xbzrle+lz4", "xen+zstd"} <= set(names)


@pytest.mark.parametrize("name", list_codecs())
def test_every_listed_name_builds_a_codec_with_that_name(name):
    codec = get_codec(name)
    assert codec.name == name
    expected = ChainCodec if "+" in name else (EntropyCodec if name in ("zstd", "lz4") else PageCodec)
    assert isinstance(codec, expected)


@pytest.mark.parametrize("name", ["native+zstd", "zstd", "native", "xen+lz4"])
def test_config_rebuilds_an_equal_codec(name):
    codec = get_codec(name, level=5) if "zstd" in name else get_codec(name)
    config = codec.get_config()
    rebuilt = get_codec(config)
    assert rebuilt.name == codec.name and rebuilt.get_config() == config


def test_options_reach_the_part_that_takes_them():
    codec = get_codec("native+zstd", level=7, emit_zero=False)
    assert codec.get_config() == {"id": "native+zstd", "emit_zero": False, "level": 7}


@pytest.mark.parametrize("name, options, match", [
    ("brotli", {}, "unknown codec"),
    ("native+xen", {}, "unknown codec"),
    ("zstd+native", {}, "unknown codec"),
    ("native+zstd+lz4", {}, "unknown codec"),
    ("", {}, "unknown codec"),
    ("native", {"level": 3}, "takes no option level"),
    ("zstd", {"level": 0}, "level"),
    ("zstd", {"level": "fast"}, "level"),
    ("native", {"emit_zero": "yes"}, "emit_zero"),
])
def test_bad_names_and_options_raise_config_error(name, options, match):
    with pytest.raises(ConfigError, match=match):
        get_codec(name, **options)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        get_codec("nope")


@pytest.fixture
def pages():
    return np.zeros((2, 4096), dtype=np.uint8)


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda p: p.astype(np.int16), TypeError, "dtype uint8"),
    (lambda p: p.tolist(), TypeError, "numpy array"),
    (lambda p: p.reshape(-1), ValueError, "shape"),
    (lambda p: np.zeros((2, 1000), np.uint8), ValueError, "power of two"),
    (lambda p: np.zeros((2, 256), np.uint8), ValueError, "power of two"),
    (lambda p: np.zeros((2, 8192), np.uint8)[:, ::2], ValueError, "C-contiguous"),
])
@pytest.mark.parametrize("argument", ["current", "cached"])
def test_encode_rejects_bad_arrays(pages, make_bad, error, match, argument):
    codec = get_codec("native")
    arguments = {"current": pages, "cached": pages.copy()}
    arguments[argument] = make_bad(pages)
    with pytest.raises(error, match=match):
        codec.encode(arguments["current"], arguments["cached"])


def test_encode_rejects_a_read_only_cache_and_mismatched_sizes(pages):
    codec = get_codec("native")
    read_only = pages.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        codec.encode(pages, read_only)
    with pytest.raises(ValueError, match="cached pages"):
        codec.encode(pages, np.zeros((3, 4096), np.uint8))
    with pytest.raises(ValueError, match="bytes"):
        codec.encode(pages, np.zeros((2, 8192), np.uint8))


def test_encode_checks_slots(pages):
    codec = get_codec("native")
    with pytest.raises(IndexError, match="slots"):
        codec.encode(pages, pages.copy(), slots=np.array([0, 2]))
    with pytest.raises(IndexError, match="slots"):
        codec.encode(pages, pages.copy(), slots=np.array([0, 2**63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(pages, pages.copy(), slots=np.array([0]))
    with pytest.raises(TypeError, match="integer"):
        codec.encode(pages, pages.copy(), slots=np.array([0.0, 1.0]))


def test_decode_rejects_bad_replicas_and_arrays(pages):
    codec = get_codec("native")
    encoded = codec.encode(pages, pages.copy())
    read_only = pages.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        codec.decode(encoded, read_only)
    with pytest.raises(ValueError, match="C-contiguous"):
        codec.decode(encoded, np.zeros((2, 8192), np.uint8)[:, ::2])
    encoded.kinds = encoded.kinds.astype(np.int32)
    with pytest.raises(TypeError, match="kinds"):
        codec.decode(encoded, pages)


def test_decode_accepts_uint32_offsets_and_read_only_payloads(pages):
    codec = get_codec("native")
    current = pages.copy()
    current[1, 10] = 1
    encoded = codec.encode(current, pages.copy())
    encoded.offsets = encoded.offsets.astype(np.uint32)
    encoded.payload = np.frombuffer(encoded.payload.tobytes(), dtype=np.uint8)   # read-only, like a ZeroMQ frame
    codec.decode(encoded, pages)
    assert np.array_equal(pages, current)


def test_corrupt_data_is_a_value_error():
    assert issubclass(CorruptData, ValueError)
