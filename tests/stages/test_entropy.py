"""zstd / lz4 compress a batch's payload as one frame; decode undoes them, bounded and checked."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import DELTAS, ENCODED, PAGES, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.stage import StageContext
from stages.entropy import Decode, Lz4, Zstd

PAGE = 4096


def encoded_batch(npages: int = 4, codec: str = "native") -> Batch:
    """Whole pages of a compressible pattern, as rle would emit them."""
    payload = np.tile(np.arange(64, dtype=np.uint8), npages * PAGE // 64)
    return Batch(format=ENCODED, epoch=3, page_numbers=np.arange(npages, dtype=np.uint64),
                 kinds=np.full(npages, PageKind.FULL, np.uint8), payload=payload,
                 offsets=np.arange(npages + 1, dtype=np.uint64) * PAGE,
                 meta={"codec": codec, "raw_size": npages * PAGE})


def run(stage, batch: Batch) -> Batch:
    stage.start(StageContext(stage.factory_name))
    (out,) = list(stage.handle(batch))
    return out


def over_the_wire(batch: Batch) -> Batch:
    return Batch.from_frames([bytes(frame) for frame in batch.to_frames()])


@pytest.mark.parametrize("stage, coder", [(Zstd, "zstd"), (Lz4, "lz4")])
def test_compress_then_decode_restores_the_payload(stage, coder):
    original = encoded_batch()
    compressed = run(stage(), original)
    assert compressed.meta == {"codec": f"native+{coder}", "raw_size": 4 * PAGE}
    assert compressed.payload.shape[0] < original.payload.shape[0] // 10
    decoded = run(Decode(), over_the_wire(compressed))
    assert decoded.meta == {"codec": "native", "raw_size": 4 * PAGE}
    np.testing.assert_array_equal(decoded.payload, original.payload)
    np.testing.assert_array_equal(decoded.offsets, original.offsets)
    np.testing.assert_array_equal(decoded.page_numbers, original.page_numbers)


def test_zstd_level_is_range_checked():
    assert Zstd(level="19").level == 19
    with pytest.raises(ConfigError, match="level"):
        Zstd(level=23)


def test_second_entropy_layer_is_refused():
    with pytest.raises(ConfigError, match="lz4: .*already entropy coded"):
        run(Lz4(), run(Zstd(), encoded_batch()))


def test_control_batches_pass_through_untouched():
    marker = Batch.control(Flag.EPOCH_END, epoch=3, format=ENCODED, pages=4)
    assert run(Zstd(), marker) is marker
    assert run(Decode(), marker) is marker


def test_decode_passes_batches_without_entropy():
    batch = encoded_batch(codec="xbzrle")
    assert run(Decode(), batch) is batch


def test_decode_refuses_an_unknown_entropy_codec_by_name():
    batch = run(Zstd(), encoded_batch())
    with pytest.raises(CorruptData, match="decode: .*unknown entropy codec 'brotli'"):
        run(Decode(), batch.with_(meta={**batch.meta, "codec": "native+brotli"}))


def test_decode_refuses_an_unknown_run_format_by_name():
    with pytest.raises(CorruptData, match="decode: .*unknown run format 'lzw'"):
        run(Decode(), encoded_batch(codec="lzw"))


def test_decode_bounds_the_decompressed_size():
    batch = run(Zstd(), encoded_batch())
    with pytest.raises(CorruptData, match="raw_size 16384 exceeds max-batch 4096"):
        run(Decode(max_batch="4KiB"), batch)


@pytest.mark.parametrize("raw_size", [-1, "16384", None, 2**70])
def test_decode_refuses_a_bad_raw_size(raw_size):
    batch = run(Zstd(), encoded_batch())
    with pytest.raises(CorruptData, match="raw_size"):
        run(Decode(), batch.with_(meta={**batch.meta, "raw_size": raw_size}))


def test_decode_refuses_raw_size_other_than_the_last_offset():
    batch = run(Zstd(), encoded_batch())
    offsets = batch.offsets.copy()
    offsets[-1] -= 1
    with pytest.raises(CorruptData, match="differs from the last offset"):
        run(Decode(), batch.with_(offsets=offsets))


@pytest.mark.parametrize("coder", [Zstd, Lz4])
def test_decode_refuses_a_corrupt_payload(coder):
    batch = run(coder(), encoded_batch())
    damaged = batch.payload.copy()
    damaged[len(damaged) // 2:] ^= 0x5A
    for payload in (damaged, batch.payload[: len(batch.payload) // 2]):
        with pytest.raises(CorruptData):
            run(Decode(), batch.with_(payload=payload))


def test_decode_refuses_more_than_one_entropy_layer():
    batch = run(Zstd(), encoded_batch())
    with pytest.raises(CorruptData, match="2 entropy layers"):
        run(Decode(), batch.with_(meta={**batch.meta, "codec": "native+zstd+lz4"}))


def test_decode_passes_whole_pages_through():
    pages = Batch(page_numbers=np.zeros(1, np.uint64), kinds=np.zeros(1, np.uint8), data=np.ones((1, PAGE), np.uint8))
    assert run(Decode(), pages) is pages
    assert Decode().output_format(PAGES) == PAGES and Decode().output_format(ENCODED) == ENCODED


def test_entropy_stages_refuse_other_formats_naming_themselves():
    pages = Batch(page_numbers=np.zeros(1, np.uint64), kinds=np.zeros(1, np.uint8), data=np.zeros((1, PAGE), np.uint8))
    with pytest.raises(CorruptData, match="zstd: expected an encoded batch"):
        run(Zstd(), pages)
    with pytest.raises(CorruptData, match="decode: expected an encoded batch"):
        run(Decode(), pages.with_(format=DELTAS))
    with pytest.raises(CorruptData, match="decode: .*names no codec"):
        run(Decode(), encoded_batch().with_(meta={}))


def test_decode_bounds_raw_size_by_what_the_pages_can_encode_to():
    batch = run(Zstd(), encoded_batch(npages=1))
    offsets = np.array([0, 3 * PAGE], np.uint64)
    with pytest.raises(CorruptData, match="exceeds what 1 pages can encode to"):
        run(Decode(), batch.with_(offsets=offsets, meta={**batch.meta, "raw_size": 3 * PAGE}))


BYTE_FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4)


@settings(max_examples=150, deadline=None)
@given(coder=st.sampled_from([Zstd, Lz4]), cut=st.integers(0, 400), flips=BYTE_FLIPS,
       raw_size=st.one_of(st.none(), st.integers(-5, 1 << 20)))
def test_damaged_batches_decode_or_raise_corrupt_data(coder, cut, flips, raw_size):
    """Truncated, flipped or mislabelled payloads: CorruptData, or a consistent batch; never another error."""
    batch = over_the_wire(run(coder(), encoded_batch()))
    payload = batch.payload[: max(len(batch.payload) - cut, 0)].copy()
    for position, value in flips:
        if len(payload):
            payload[position % len(payload)] ^= value
    meta = batch.meta if raw_size is None else {**batch.meta, "raw_size": raw_size}
    try:
        decoded = run(Decode(), batch.with_(payload=payload, meta=meta))
    except CorruptData:
        return
    decoded.validate()
    assert decoded.payload.shape[0] == decoded.meta["raw_size"] == int(decoded.offsets[-1])


def test_decode_refuses_a_payload_of_the_wrong_type():
    batch = run(Zstd(), encoded_batch())
    with pytest.raises(CorruptData, match="decode: payload of epoch 3 is not a 1-D uint8 array"):
        run(Decode(), batch.with_(payload=batch.payload.astype(np.uint16)))
