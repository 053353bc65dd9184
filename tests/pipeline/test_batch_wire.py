"""The batch's multipart form: round trips, and every malformed message is CorruptData."""
import json

import numpy as np
import pytest
import zmq

from pipeline.batch import ENCODED, Batch, Flag, PageKind
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


def _frames_with_header(mutate):
    frames = [bytes(f) for f in _page_batch(n=2).to_frames()]
    header = json.loads(frames[0])
    mutate(header, frames)
    frames[0] = json.dumps(header).encode()
    return frames


@pytest.mark.parametrize("mutate,message", [
    (lambda h, f: h.update(v=99), "version"),
    (lambda h, f: h["arrays"].update(data=[3, 4096]), "elements"),
    (lambda h, f: h["arrays"].update(bogus=[1]), "frames for"),
    (lambda h, f: h.update(format="video"), "unknown format"),
    (lambda h, f: h.update(page_size=512), "data shape"),
    (lambda h, f: h["arrays"].update(kinds=[-1]), "bad shape"),
    (lambda h, f: h.pop("epoch"), "malformed"),
    (lambda h, f: f.pop(), "frames for"),
])
def test_malformed_messages_raise_corrupt_data(mutate, message):
    with pytest.raises(CorruptData, match=message):
        Batch.from_frames(_frames_with_header(mutate))


def test_header_that_is_not_json_is_corrupt():
    with pytest.raises(CorruptData, match="not JSON"):
        Batch.from_frames([b"\xff\x00garbage"])


def test_offsets_beyond_payload_are_corrupt():
    batch = Batch(format=ENCODED, page_numbers=np.array([1], np.uint64), kinds=np.array([4], np.uint8),
                  payload=np.zeros(4, np.uint8), offsets=np.array([0, 400], np.uint64))
    with pytest.raises(CorruptData, match="offsets"):
        Batch.from_frames([bytes(f) for f in batch.to_frames()])
