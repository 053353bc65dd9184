"""The batch's multipart form: round trips, small batches in one frame, and every malformed message is CorruptData."""
import numpy as np
import pytest
import zmq

from pipeline.batch import _ARRAY, _HEADER, ENCODED, Batch, Flag, PageKind
from pipeline.errors import CorruptData


def _page_batch(n=5, page_size=4096):
    rng = np.random.default_rng(1)
    return Batch(epoch=3, sequence=9, flags=Flag.RESYNC, page_size=page_size,
                 page_numbers=np.arange(10, 10 + n, dtype=np.uint64),
                 kinds=np.full(n, PageKind.NORMAL, np.uint8),
                 data=rng.integers(0, 256, (n, page_size), dtype=np.uint8), meta={"note": "x"})


def test_page_batch_round_trips_through_real_zmq_sockets():
    batch = _page_batch()
    context = zmq.Context.instance()
    with context.socket(zmq.PUSH) as push, context.socket(zmq.PULL) as pull:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send_multipart(batch.to_frames(), copy=False)
        assert pull.poll(5000)
        received = Batch.from_frames(pull.recv_multipart(copy=False))
    assert (received.epoch, received.sequence, received.flags, received.meta) == (3, 9, Flag.RESYNC, {"note": "x"})
    np.testing.assert_array_equal(received.page_numbers, batch.page_numbers)
    np.testing.assert_array_equal(received.data, batch.data)


def test_encoded_batch_round_trips():
    batch = Batch(format=ENCODED, page_numbers=np.array([1, 2], np.uint64), kinds=np.array([4, 5], np.uint8),
                  payload=np.arange(7, dtype=np.uint8), offsets=np.array([0, 7, 7], np.uint64), meta={"codec": "native"})
    received = Batch.from_frames([bytes(f) for f in batch.to_frames()])
    np.testing.assert_array_equal(received.payload, batch.payload)
    np.testing.assert_array_equal(received.offsets, batch.offsets)


def test_control_batches_carry_no_pages():
    marker = Batch.control(Flag.EPOCH_END, 4, pages=12, digest=99)
    assert marker.is_control and marker.npages == 0 and marker.nbytes == 0
    received = Batch.from_frames([bytes(f) for f in marker.to_frames()])
    assert received.is_control and received.meta == {"pages": 12, "digest": 99}


def test_small_batches_are_one_frame_and_large_arrays_get_frames_of_their_own():
    small, large = _page_batch(n=2), _page_batch(n=20)
    assert len(small.to_frames()) == 1
    frames = large.to_frames()
    assert len(frames) == 2 and len(frames[1]) == large.data.nbytes  # page numbers and kinds ride in the header
    received = Batch.from_frames([bytes(f) for f in frames])
    np.testing.assert_array_equal(received.kinds, large.kinds)
    assert received.page_numbers.ctypes.data % 8 == 0  # inline arrays stay aligned for the kernels


def test_meta_is_left_out_of_the_header_when_empty():
    plain, annotated = (Batch.control(Flag.EPOCH_END, 1, **meta).to_frames()[0] for meta in ({}, {"pages": 3}))
    assert (_fields(plain)["meta"], _fields(annotated)["meta"]) == (0, len(b'{"pages":3}'))


def _fields(frame: bytes) -> dict:
    names = ("magic", "version", "format", "count", "flags", "epoch", "sequence", "stream", "page_size", "meta")
    return dict(zip(names, _HEADER.unpack_from(frame)))


def _with_fields(frame: bytes, **changes) -> bytes:
    return _HEADER.pack(*{**_fields(frame), **changes}.values()) + frame[_HEADER.size:]


def _with_array(frame: bytes, index: int, **changes) -> bytes:
    start = _HEADER.size + index * _ARRAY.size
    fields = dict(zip(("code", "ndim", "inline", "rows", "columns"), _ARRAY.unpack_from(frame, start)))
    return frame[:start] + _ARRAY.pack(*{**fields, **changes}.values()) + frame[start + _ARRAY.size:]


def _large_frames():
    """Header (page numbers, kinds inline; meta {"note": "x"}) + the data frame."""
    return [bytes(f) for f in _page_batch(n=20).to_frames()]


@pytest.mark.parametrize("mutate,message", [
    (lambda f: [_with_fields(f[0], version=99), f[1]], "version"),
    (lambda f: [b"PB"], "shorter"),
    (lambda f: [_with_array(f[0], 2, rows=3), f[1]], "header says shape"),
    (lambda f: f + [b"extra"], "frames for"),
    (lambda f: f[:1], "needs frame"),
    (lambda f: [_with_fields(f[0], format=9), f[1]], "unknown format"),
    (lambda f: [_with_fields(f[0], count=9), f[1]], "arrays"),
    (lambda f: [_with_fields(f[0], page_size=512), f[1]], "data shape"),
    (lambda f: [_with_array(f[0], 1, ndim=3), f[1]], "bad shape"),
    (lambda f: [_with_array(f[0], 1, rows=1 << 62), f[1]], "bad shape"),
    (lambda f: [_with_array(f[0], 1, rows=4096), f[1]], "beyond"),
    (lambda f: [_with_array(f[0], 1, code=0), f[1]], "repeated"),
    (lambda f: [_with_array(f[0], 1, code=77), f[1]], "unknown"),
    (lambda f: [_with_fields(f[0], meta=1 << 30), f[1]], "does not fit"),
    (lambda f: [f[0].replace(b'{"note":"x"}', b'{"note":"x"]'), f[1]], "not JSON"),
    (lambda f: [f[0].replace(b'{"note":"x"}', b'["note","x"]'), f[1]], "not an object"),
    (lambda f: [f[0] + b"\0" * 8, f[1]], "left over"),
])
def test_malformed_messages_raise_corrupt_data(mutate, message):
    with pytest.raises(CorruptData, match=message):
        Batch.from_frames(mutate(_large_frames()))


def test_header_that_is_not_a_batch_is_corrupt():
    with pytest.raises(CorruptData, match="not a version"):
        Batch.from_frames([b"\xff\x00garbage" * 8])


def test_offsets_beyond_payload_are_corrupt():
    batch = Batch(format=ENCODED, page_numbers=np.array([1], np.uint64), kinds=np.array([4], np.uint8),
                  payload=np.zeros(4, np.uint8), offsets=np.array([0, 400], np.uint64))
    with pytest.raises(CorruptData, match="offsets"):
        Batch.from_frames([bytes(f) for f in batch.to_frames()])


def test_a_batch_without_pages_keeps_its_empty_page_data_shape():
    empty = Batch(page_numbers=np.zeros(0, np.uint64), kinds=np.zeros(0, np.uint8), data=np.zeros((0, 4096), np.uint8))
    assert Batch.from_frames([bytes(f) for f in empty.to_frames()]).data.shape == (0, 4096)


def test_a_batch_of_unknown_format_is_refused_before_it_is_sent():
    with pytest.raises(CorruptData, match="unknown format 'video'"):
        Batch(format="video").to_frames()


def test_a_bundle_of_small_and_large_batches_comes_back_in_order():
    marker = Batch.control(Flag.EPOCH_END, 3, pages=25)
    batches = [_page_batch(n=2), _page_batch(n=20), marker]
    frames = [bytes(frame) for batch in batches for frame in batch.to_frames()]
    received = Batch.bundle_from_frames(frames)
    assert [b.npages for b in received] == [2, 20, 0] and received[2].meta == {"pages": 25}
    assert np.array_equal(received[1].data, batches[1].data)


@pytest.mark.parametrize("damage", [lambda f: f + [b"\xff\x00garbage" * 8], lambda f: f[:-1], lambda f: []])
def test_a_damaged_bundle_is_corrupt_data(damage):
    frames = [bytes(frame) for batch in (_page_batch(n=2), _page_batch(n=20)) for frame in batch.to_frames()]
    with pytest.raises(CorruptData):
        Batch.bundle_from_frames(damage(frames))


def test_a_single_batch_message_takes_no_extra_frames():
    frames = _large_frames() + [bytes(_page_batch(n=2).to_frames()[0])]
    with pytest.raises(CorruptData, match="3 frames for 1 frame arrays"):
        Batch.from_frames(frames)


def test_with_replaces_fields_like_dataclasses_replace_and_rejects_unknown_ones():
    batch = _page_batch(n=2)
    copy = batch.with_(epoch=4, meta={})
    assert (copy.epoch, copy.meta, batch.epoch, batch.meta) == (4, {}, 3, {"note": "x"})
    assert copy.data is batch.data
    with pytest.raises(TypeError, match="no field"):
        batch.with_(epochs=4)


def test_flag_arithmetic_gives_flag_members():
    both = Flag.EPOCH_END | Flag.RESYNC
    assert both & Flag.RESYNC is Flag.RESYNC and 8 & both is Flag.RESYNC
    assert both & Flag.LAYOUT is Flag.NONE and not both & Flag.LAYOUT
    assert (Flag.NONE | 4) is Flag.LAYOUT and isinstance(Flag(16) | 1, Flag)


def test_a_parsed_batch_has_every_field_in_order_as_one_built_by_its_constructor():
    import dataclasses
    names = [field.name for field in dataclasses.fields(Batch)]
    for batch in (Batch.control(Flag.EPOCH_END, 3, pages=2),
                  Batch(epoch=1, page_numbers=np.arange(2, dtype=np.uint64), kinds=np.zeros(2, np.uint8),
                        data=np.zeros((2, 4096), np.uint8))):
        parsed = Batch.from_frames(batch.to_frames())
        assert list(parsed.__dict__) == names
        assert [bytes(frame) for frame in parsed.to_frames()] == [bytes(frame) for frame in batch.to_frames()]
        assert parsed.page_numbers.dtype == np.uint64 and parsed.kinds.dtype == np.uint8
