"""Frozen formats: stored encodings keep decoding to the stored pages, and run formats keep encoding the same."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.batch import PageKind
from stages.codecs import Encoded, get_codec

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.npz"))


def load(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    chain = path.stem.rsplit("-", 1)[0]
    with np.load(path) as stored:
        return chain, {key: stored[key] for key in stored.files}


def test_every_format_has_fixtures():
    chains = {load(path)[0] for path in FIXTURES}
    assert {"native", "xbzrle", "xen", "native+zstd", "xbzrle+lz4", "xen+zstd"} <= chains
    assert {int(load(path)[1]["cached"].shape[1]) for path in FIXTURES} >= {512, 4096, 65536}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_stored_encoding_decodes_to_the_stored_pages(path):
    chain, stored = load(path)
    encoded = Encoded(payload=stored["payload"], offsets=stored["offsets"], kinds=stored["kinds"], codec=chain,
                      raw_size=int(stored["raw_size"]))
    replica = stored["cached"].copy()
    get_codec(chain).decode(encoded, replica)
    assert np.array_equal(replica, stored["current"])


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_run_formats_still_encode_to_the_stored_bytes(path):
    chain, stored = load(path)
    run_format = chain.split("+")[0]
    encoded = get_codec(run_format).encode(stored["current"], stored["cached"].copy())
    assert np.array_equal(encoded.offsets, stored["offsets"])
    assert np.array_equal(encoded.kinds, stored["kinds"])
    if run_format == chain:
        assert encoded.payload.tobytes() == stored["payload"].tobytes()
    assert encoded.raw_size == int(stored["raw_size"])


def test_native_example_from_format_md():
    cached = np.zeros((1, 4096), dtype=np.uint8)
    current = cached.copy()
    current[0, 100:104] = [0xDE, 0xAD, 0xBE, 0xEF]
    current[0, 4095] = 1
    encoded = get_codec("native").encode(current, cached)
    assert encoded.kinds.tolist() == [PageKind.DELTA]
    assert encoded.payload.tobytes() == bytes.fromhex("6403deadbeef971f0001")
