"""Transport stages over real files, real ZeroMQ sockets and real processes; trace replay and conversion."""
from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zmq

from stages.bench.realmemory import find_corpus
from pipeline.batch import PAGES, STREAM, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData, StageFailed, TransportError
from pipeline.pipeline import Pipeline
from pipeline.stage import StageContext
from pipeline.worker import await_disconnect
from stages.framer import Frame, deframe_stream
from stages.common.pages import combine_digests, digest_pages
from stages.transport import (FileSink, FileSource, TraceSource, TraceSourceInto, ZmqSink, ZmqSource,
                              write_trace_from_npz)

PAGE = 4096
ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "stream-v1.pagepipe"
FIXTURE_V2 = Path(__file__).parent / "fixtures" / "stream-v2.pagepipe"
"""The current wire format: deframe ! frame reproduces it byte for byte (its stream identity travels along)."""
CORPUS = find_corpus()
NO_HEARTBEAT = "heartbeat=0"
"""For streams compared byte for byte: a heartbeat record is written whenever frame was idle for a while."""


def started(stage):
    stage.start(StageContext(stage.factory_name))
    return stage


def feed(stage, batches) -> list[Batch]:
    return [out for batch in batches for out in stage.handle(batch)]


def stream_batches(data: bytes, chunk: int = 5000) -> list[Batch]:
    """The stream as STREAM batches, then the end-of-stream marker, as a byte source emits it."""
    batches = [Batch(format=STREAM, payload=np.frombuffer(data[i:i + chunk], np.uint8))
               for i in range(0, len(data), chunk)]
    return batches + [Batch.control(Flag.END_OF_STREAM, 0, format=STREAM)]


def small_layout() -> Batch:
    """The layout of the small synthetic tracker streams here: one region of 64 pages, from epoch 1."""
    return Batch.control(Flag.LAYOUT, 1, regions=[{"name": "r", "start": 0, "first_page": 0, "npages": 64}])


def framed_epochs(epochs: int, pages: int = 4) -> list[Batch]:
    """frame's output for a small synthetic tracker stream."""
    frame = started(Frame())
    batches = [small_layout()]
    for epoch in range(1, epochs + 1):
        numbers = np.arange(pages, dtype=np.uint64) + epoch
        data = np.full((pages, PAGE), epoch, dtype=np.uint8)
        batches.append(Batch(format=PAGES, epoch=epoch, page_numbers=numbers,
                             kinds=np.zeros(pages, np.uint8), data=data))
        batches.append(Batch.control(Flag.EPOCH_END, epoch, pages=pages))
    batches.append(Batch.control(Flag.END_OF_STREAM, epochs))
    return feed(frame, batches)


def payload_bytes(batches) -> bytes:
    return b"".join(b.payload.tobytes() for b in batches if b.payload is not None)


def free_tcp_endpoint() -> str:
    with zmq.Context() as context, context.socket(zmq.PULL) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


# ---- files ------------------------------------------------------------------------

def test_file_sink_writes_the_stream_that_file_src_reads_back(tmp_path):
    framed = framed_epochs(3)
    sink = started(FileSink(path=str(tmp_path / "trace")))
    assert feed(sink, framed) == []
    sink.stop()
    assert (tmp_path / "trace").read_bytes() == payload_bytes(framed)
    assert sink.counters["commits"] == 4          # three epoch ends and the end of stream
    source = started(FileSource(path=str(tmp_path / "trace"), chunk_size=4096))
    read = list(source.produce())
    assert read[-1].flags == Flag.END_OF_STREAM and all(b.format == STREAM for b in read)
    assert payload_bytes(read) == payload_bytes(framed)
    assert [b.sequence for b in read] == list(range(len(read)))


def test_file_sink_on_a_full_device_names_the_stage_and_file():
    sink = started(FileSink(path="/dev/full"))
    try:
        with pytest.raises(TransportError, match="file-sink: cannot write /dev/full: No space left on device"):
            feed(sink, framed_epochs(1))
    finally:
        sink.stop()


def test_file_sink_into_a_missing_directory_is_a_transport_error(tmp_path):
    with pytest.raises(TransportError, match="file-sink: cannot create .*/missing/trace"):
        started(FileSink(path=str(tmp_path / "missing" / "trace")))


def test_file_src_of_a_missing_file_is_a_transport_error(tmp_path):
    source = started(FileSource(path=str(tmp_path / "absent")))
    with pytest.raises(TransportError, match="file-src: cannot read .*absent: No such file"):
        list(source.produce())


FILL_TINY_TMPFS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from pipeline.errors import TransportError
    from pipeline.stage import StageContext
    from stages.transport import FileSink
    sys.path.insert(0, {tests!r})
    from test_transport import framed_epochs, feed
    sink = FileSink(path=sys.argv[1])
    sink.start(StageContext("file-sink"))
    try:
        feed(sink, framed_epochs(40, pages=16))
    except TransportError as error:
        print(error)
    finally:
        sink.stop()
""")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a private tmpfs")
def test_file_sink_on_a_full_tmpfs_keeps_every_committed_epoch(tmp_path):
    mount, kept = tmp_path / "tiny", tmp_path / "kept"
    mount.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(FILL_TINY_TMPFS.format(root=str(ROOT), tests=str(Path(__file__).parent)))
    shell = (f"mount -t tmpfs -o size=256k tmpfs {mount} || exit 77; "
             f"{sys.executable} {script} {mount}/trace; cp {mount}/trace {kept}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, timeout=60)
    if result.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert "file-sink: cannot write" in result.stdout and "No space left on device" in result.stdout
    assert "kept the first" in result.stdout
    warnings = []
    context = StageContext("deframe", post=lambda kind, **fields: warnings.append(fields["message"]))
    got = list(deframe_stream([kept.read_bytes()], context=context))
    committed = [b.epoch for b in got if b.flags & Flag.EPOCH_END]
    assert 0 < len(committed) < 40 and committed == list(range(1, len(committed) + 1))
    assert warnings and "without its end-of-stream record" in warnings[0]


# ---- ZeroMQ -------------------------------------------------------------------------

def send_stream(endpoint: str, data: bytes, properties: dict) -> None:
    """Child process: zmq-sink sends the stream in 5000-byte batches."""
    sink = ZmqSink(endpoint=endpoint, timeout="10s", **properties)
    sink.start(StageContext("zmq-sink"))
    try:
        feed(sink, stream_batches(data))
    finally:
        sink.stop()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_zmq_sink_in_another_process_delivers_the_stream_to_zmq_src(tmp_path, transport, curve_keys):
    endpoint = free_tcp_endpoint() if transport == "tcp" else f"ipc://{tmp_path}/stream.ipc"
    keyed = transport == "tcp"      # CurveZMQ on tcp; ipc links need no keys
    data = FIXTURE.read_bytes()
    source = started(ZmqSource(endpoint=endpoint, timeout="20s", **(curve_keys.server() if keyed else {})))
    sender = multiprocessing.get_context("spawn").Process(
        target=send_stream, args=(endpoint, data, curve_keys.client() if keyed else {}))
    sender.start()
    try:
        received = list(source.produce())
    finally:
        sender.join(20)
        if sender.is_alive():
            sender.kill()
        source.stop()
    assert sender.exitcode == 0
    assert received[-1].flags == Flag.END_OF_STREAM
    assert payload_bytes(received) == data
    assert [b.payload.nbytes for b in received[:-1]] == [len(data[i:i + 5000]) for i in range(0, len(data), 5000)]


def receive_until(source: ZmqSource, deframe, epoch: int) -> list[Batch]:
    """Deframed batches from the source until the end of ``epoch``."""
    got = []
    for message in source.produce():
        got.extend(deframe.handle(message))
        if any(b.flags & Flag.EPOCH_END and b.epoch == epoch for b in got):
            return got
    return got


def await_receivers_gone(sink: ZmqSink) -> None:
    """Wait until ``sink`` has seen the connection of each channel's receiver close (each must have connected:
    it carried a message): what it sends from then on waits for a new receiver, while what it sent before would
    have vanished with the old connections (the receivers that matter ask again for a resync; replica-sink
    does)."""
    deadline = time.monotonic() + 10
    assert all(await_disconnect(monitor, deadline) for monitor in sink._monitors)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_restarted_receiver_resumes_at_the_senders_next_resync_segment(tmp_path, channels):
    from stages.framer import Deframe
    endpoint = f"ipc://{tmp_path}/restart.ipc"
    frame, sink = started(Frame()), started(ZmqSink(endpoint=endpoint, timeout="10s", channels=channels))

    def send_epoch(epoch: int, flags: Flag = Flag.NONE) -> None:
        numbers = np.arange(4, dtype=np.uint64) + epoch
        pages = Batch(format=PAGES, epoch=epoch, flags=flags, page_numbers=numbers, kinds=np.zeros(4, np.uint8),
                      data=np.full((4, PAGE), epoch, np.uint8))
        feed(sink, feed(frame, [pages, Batch.control(Flag.EPOCH_END | flags, epoch, pages=4)]))

    first, first_deframe = started(ZmqSource(endpoint=endpoint, timeout="10s", channels=channels)), started(Deframe())
    try:
        feed(sink, feed(frame, [small_layout()]))
        for epoch in (1, 2, 3):     # a message on every channel: each connected (await_receivers_gone)
            send_epoch(epoch)
        assert [b.epoch for b in receive_until(first, first_deframe, 3) if b.flags & Flag.EPOCH_END] == [1, 2, 3]
    finally:
        first.stop()
    second = started(ZmqSource(endpoint=endpoint, timeout="10s", channels=channels))
    second_deframe = started(Deframe(resume=True))
    try:
        await_receivers_gone(sink)
        send_epoch(4)       # skipped by the new receiver: no header, no layout
        send_epoch(5, Flag.RESYNC)                      # a new segment: header, layout, whole pages
        send_epoch(6)     # more to come: a receiver joining spread channels starts once every channel has a message
        got = receive_until(second, second_deframe, 5)
    finally:
        second.stop()
        sink.stop()
    assert [(b.epoch, b.flags) for b in got] == [(1, Flag.LAYOUT), (5, Flag.RESYNC), (5, Flag.EPOCH_END | Flag.RESYNC)]
    assert (got[1].data == 5).all() and got[0].meta["regions"][0]["npages"] == 64


def send_big_messages(endpoint: str, data: bytes) -> None:
    """Child process: zmq-sink sends ``data`` as 1 MiB messages, then ends the stream and exits."""
    sink = ZmqSink(endpoint=endpoint, timeout="20s")
    sink.start(StageContext("zmq-sink"))
    try:
        feed(sink, stream_batches(data, chunk=1 << 20))
    finally:
        sink.stop()


def test_a_stream_ends_whole_over_ipc_however_slowly_the_receiver_reads(tmp_path):
    """ZeroMQ drops bytes its I/O thread has not written yet when a socket closes (libzmq issue 4660): zmq-sink
    must not exit before the receiver has the end of the stream, however slowly it reads."""
    endpoint = f"ipc://{tmp_path}/slow.ipc"
    data = np.random.default_rng(7).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    source = started(ZmqSource(endpoint=endpoint, timeout="5s", hwm=1))
    sender = multiprocessing.get_context("spawn").Process(target=send_big_messages, args=(endpoint, data))
    sender.start()
    received = []
    try:
        for batch in source.produce():      # slowly: the sender's last bytes wait in its I/O thread
            received.append(batch)
            time.sleep(0.05)
        sender.join(20)
    finally:
        if sender.is_alive():
            sender.kill()
        source.stop()
    assert sender.exitcode == 0
    assert received[-1].flags == Flag.END_OF_STREAM
    assert payload_bytes(received) == data


def test_zmq_sink_warns_when_the_receiver_keeps_its_connection_after_the_end(tmp_path):
    endpoint = f"ipc://{tmp_path}/raw.ipc"
    receiver = zmq.Context.instance().socket(zmq.PULL)   # a foreign receiver that never closes
    receiver.bind(endpoint)
    warnings: list[str] = []
    sink = ZmqSink(endpoint=endpoint, timeout="300ms")
    sink.start(StageContext("zmq-sink", post=lambda kind, **fields: warnings.append(fields.get("message", ""))))
    try:
        feed(sink, stream_batches(b"x" * 10000))
        assert receiver.poll(1000) and receiver.recv() == b"x" * 5000
    finally:
        sink.stop()
        receiver.close(linger=0)
    assert any("did not close its connection within 0.3 s of the stream's end" in text for text in warnings)


def test_zmq_sink_to_an_unreachable_endpoint_is_a_transport_error():
    sink = started(ZmqSink(endpoint=free_tcp_endpoint(), timeout="300ms", insecure=True))
    try:
        with pytest.raises(TransportError, match=r"zmq-sink: no receiver took data at tcp://127\.0\.0\.1:\d+"):
            feed(sink, framed_epochs(1))
    finally:
        sink.stop()


def test_zmq_sink_bound_with_no_receiver_is_a_transport_error(tmp_path):
    sink = started(ZmqSink(endpoint=f"ipc://{tmp_path}/nobody.ipc", bind=True, timeout="200ms"))
    try:
        with pytest.raises(TransportError, match="within 0.2 s"):
            feed(sink, framed_epochs(1))
    finally:
        sink.stop()


def test_zmq_src_waiting_past_its_timeout_is_a_transport_error(tmp_path):
    source = started(ZmqSource(endpoint=f"ipc://{tmp_path}/quiet.ipc", timeout="200ms"))
    try:
        with pytest.raises(TransportError, match="zmq-src: nothing received on ipc://.* for 0.2 s"):
            list(source.produce())
    finally:
        source.stop()


def test_zmq_src_on_an_endpoint_in_use_is_a_transport_error():
    endpoint = free_tcp_endpoint()
    first = started(ZmqSource(endpoint=endpoint, timeout="1s", insecure=True))
    try:
        with pytest.raises(TransportError, match=f"zmq-src: cannot bind {endpoint}"):
            started(ZmqSource(endpoint=endpoint, insecure=True))
    finally:
        first.stop()


def test_zmq_src_drops_a_sender_whose_message_exceeds_the_limit(tmp_path):
    endpoint = f"ipc://{tmp_path}/big.ipc"
    source = started(ZmqSource(endpoint=endpoint, timeout="500ms", max_message="1MiB"))
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(endpoint)
        push.send(bytes((1 << 20) + 1))
        try:
            with pytest.raises(TransportError, match="nothing received"):
                list(source.produce())
        finally:
            push.close(linger=0)
            source.stop()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_zmq_sink_sends_a_large_batch_in_messages_any_receiver_accepts(tmp_path, transport, curve_keys):
    """Pieces of 1 MiB, the smallest max-message a zmq-src takes, also when CurveZMQ makes each frame longer."""
    endpoint = f"ipc://{tmp_path}/pieces.ipc" if transport == "ipc" else free_tcp_endpoint()
    keyed = transport == "tcp"
    source = started(ZmqSource(endpoint=endpoint, timeout="10s", **(curve_keys.server() if keyed else {})))
    sink = started(ZmqSink(endpoint=endpoint, timeout="10s", **(curve_keys.client() if keyed else {})))
    data = np.random.default_rng(3).integers(0, 256, (5 << 20) + 7, dtype=np.uint8)
    try:
        with ThreadPoolExecutor(1) as sending:   # zmq-sink waits at the end until the receiver closes
            sent = sending.submit(feed, sink, [Batch(format=STREAM, payload=data),
                                               Batch.control(Flag.END_OF_STREAM, 0, format=STREAM)])
            received = list(source.produce())
            sent.result()
    finally:
        sink.stop()
        source.stop()
    assert [b.payload.nbytes for b in received[:-1]] == [1 << 20] * 5 + [7]
    assert payload_bytes(received) == data.tobytes()


def test_zmq_src_drops_multipart_messages_and_says_so(tmp_path):
    endpoint = f"ipc://{tmp_path}/multi.ipc"
    warnings = []
    source = ZmqSource(endpoint=endpoint, timeout="10s")
    source.start(StageContext("zmq-src", post=lambda kind, **fields: warnings.append(fields["message"])))
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(endpoint)
        push.send_multipart([b"injected", b"parts"])
        push.send(b"stream bytes")
        push.send(b"")
        try:
            received = list(source.produce())
        finally:
            push.close(linger=0)
            source.stop()
    assert payload_bytes(received) == b"stream bytes"
    assert source.counters["multipart_refused"] == 1 and "dropped a multipart message" in warnings[0]


def test_a_zmq_stage_without_endpoint_is_a_transport_error():
    with pytest.raises(TransportError, match="zmq-sink: no endpoint= given"):
        started(ZmqSink())


# ---- trace replay -------------------------------------------------------------------

def write_npz(path: Path, epochs: int = 3) -> dict:
    """A small recorded trace in the corpus layout: base + epochNNN_pages/_data."""
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, (24, PAGE), dtype=np.uint8)
    base[5] = 0
    arrays = {"base": base, "region_starts": np.array([0x1000000, 0x7FF000000], np.uint64),
              "region_npages": np.array([16, 8], np.uint64)}
    for epoch in range(epochs):
        numbers = np.sort(rng.choice(24, 4, replace=False)).astype(np.uint64)
        data = rng.integers(0, 256, (4, PAGE), dtype=np.uint8)
        data[0] = 0
        arrays[f"epoch{epoch:03d}_pages"], arrays[f"epoch{epoch:03d}_data"] = numbers, data
    np.savez(path, **arrays)
    return arrays


def replay(path: Path, **properties) -> list[Batch]:
    return list(started(TraceSource(path=str(path), **properties)).produce())


def epochs_of(batches: list[Batch]) -> dict[int, tuple[np.ndarray, np.ndarray, dict]]:
    """epoch -> (page numbers, data, epoch-end meta) from a tracker-style stream."""
    result, pages = {}, []
    for batch in batches:
        if batch.flags & Flag.EPOCH_END:
            numbers = np.concatenate([b.page_numbers for b in pages]) if pages else np.empty(0, np.uint64)
            data = np.concatenate([b.data for b in pages]) if pages else np.empty((0, PAGE), np.uint8)
            result[batch.epoch] = (numbers, data, batch.meta)
            pages = []
        elif not batch.is_control:
            pages.append(batch)
    return result


def test_trace_from_npz_replays_as_the_tracker_stream_it_was_recorded_from(tmp_path):
    arrays = write_npz(tmp_path / "rec.npz")
    assert write_trace_from_npz(tmp_path / "rec.npz", tmp_path / "rec.trace") == 4
    out = replay(tmp_path / "rec.trace", batch_pages=10)
    assert out[0].flags == Flag.LAYOUT and out[-1].flags == Flag.END_OF_STREAM
    assert [r["npages"] for r in out[0].meta["regions"]] == [16, 8]
    assert [r["first_page"] for r in out[0].meta["regions"]] == [0, 16]
    assert [b.sequence for b in out] == list(range(len(out)))
    assert all(b.npages <= 10 and (b.kinds == PageKind.NORMAL).all() for b in out if not b.is_control)
    epochs = epochs_of(out)
    assert sorted(epochs) == [1, 2, 3, 4]
    numbers, data, meta = epochs[1]
    assert numbers.tolist() == list(range(24)) and np.array_equal(data, arrays["base"])
    assert meta["pages"] == 24 and meta["time"] == 0.0
    for epoch in (2, 3, 4):
        numbers, data, meta = epochs[epoch]
        assert numbers.tolist() == arrays[f"epoch{epoch - 2:03d}_pages"].tolist()
        assert np.array_equal(data, arrays[f"epoch{epoch - 2:03d}_data"])
        assert meta["digest"] == combine_digests(numbers, digest_pages(data))
        assert meta["time"] == pytest.approx((epoch - 1) * 0.025)


def test_trace_src_decodes_encoded_epochs_to_the_pages_their_digests_name():
    epochs = epochs_of(replay(FIXTURE))
    assert sorted(epochs) == [1, 2, 3, 4]
    for epoch, (numbers, data, meta) in epochs.items():
        assert meta["digest"] == combine_digests(numbers, digest_pages(data)), f"epoch {epoch}"
    assert len(epochs[3][0]) == 12 and len(epochs[4][0]) == 0


def test_trace_src_at_the_recorded_pace_emits_the_same_stream():
    fast, paced = replay(FIXTURE), replay(FIXTURE, pace="recorded")
    assert [(b.epoch, b.flags, b.page_numbers.tolist()) for b in paced] == \
           [(b.epoch, b.flags, b.page_numbers.tolist()) for b in fast]


def test_trace_src_preloaded_emits_the_same_stream_as_decoding_on_the_fly():
    on_the_fly, preloaded = replay(FIXTURE, batch_pages=5), replay(FIXTURE, batch_pages=5, preload=True)
    assert [(b.sequence, b.epoch, b.flags, b.page_numbers.tolist()) for b in preloaded] == \
           [(b.sequence, b.epoch, b.flags, b.page_numbers.tolist()) for b in on_the_fly]
    assert all(np.array_equal(p.data, f.data) for p, f in zip(preloaded, on_the_fly) if not p.is_control)
    paced = replay(FIXTURE, batch_pages=5, preload=True, pace="recorded")
    assert [b.page_numbers.tolist() for b in paced] == [b.page_numbers.tolist() for b in on_the_fly]


def test_trace_src_groups_pages_by_the_next_stages_shard_and_emits_the_same_epochs():
    source = TraceSource(path=str(FIXTURE), batch_pages=5)
    source.start(StageContext("trace-src", output_shards=3))
    sharded = list(source.produce())
    assert all(len({int(n) % 3 for n in b.page_numbers}) == 1 for b in sharded if not b.is_control)
    plain, grouped = epochs_of(replay(FIXTURE, batch_pages=5)), epochs_of(sharded)
    assert sorted(plain) == sorted(grouped)
    for epoch, (numbers, data, meta) in plain.items():
        order, again = np.argsort(numbers), np.argsort(grouped[epoch][0])
        assert np.array_equal(numbers[order], grouped[epoch][0][again])
        assert np.array_equal(data[order], grouped[epoch][1][again]) and grouped[epoch][2] == meta


def test_trace_src_preload_decodes_the_whole_trace_before_its_first_batch(tmp_path):
    damaged = bytearray(FIXTURE.read_bytes())
    damaged[-40] ^= 0xFF                                    # in the last records
    (tmp_path / "bad").write_bytes(damaged)
    assert next(started(TraceSource(path=str(tmp_path / "bad"))).produce()).flags & Flag.LAYOUT
    with pytest.raises(CorruptData, match="checksum mismatch"):
        next(started(TraceSource(path=str(tmp_path / "bad"), preload=True)).produce())


def test_trace_src_of_a_corrupt_trace_is_corrupt_data(tmp_path):
    damaged = bytearray(FIXTURE.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / "bad").write_bytes(damaged)
    with pytest.raises(CorruptData, match="checksum mismatch"):
        replay(tmp_path / "bad")


def test_trace_src_refuses_a_layout_larger_than_its_image_limit(tmp_path):
    (tmp_path / "trace").write_bytes(payload_bytes(framed_epochs(1)))       # a layout of 64 pages
    with pytest.raises(CorruptData, match="layout of 64 pages exceeds max-image=131072"):
        list(started(TraceSource(path=str(tmp_path / "trace"), max_image="128KiB")).produce())


def test_write_trace_refuses_epoch_data_of_the_wrong_shape(tmp_path):
    arrays = write_npz(tmp_path / "rec.npz", epochs=1)
    arrays["epoch000_data"] = arrays["epoch000_data"][:3]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CorruptData, match=r"trace epoch 2: data shape \(3, 4096\) for 4 pages"):
        write_trace_from_npz(tmp_path / "bad.npz", tmp_path / "bad.trace")


def test_write_trace_refuses_an_npz_without_the_recorded_arrays(tmp_path):
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(CorruptData, match="recorded trace has no array 'base'"):
        write_trace_from_npz(tmp_path / "empty.npz", tmp_path / "empty.trace")


def test_write_trace_refuses_regions_that_do_not_cover_the_base(tmp_path):
    arrays = write_npz(tmp_path / "rec.npz", epochs=1)
    arrays["region_npages"] = np.array([16, 9], np.uint64)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CorruptData, match="regions of 25 pages for 24 base pages"):
        write_trace_from_npz(tmp_path / "bad.npz", tmp_path / "bad.trace")


@pytest.mark.skipif(CORPUS is None, reason="the recorded corpus is not available")
def test_the_recorded_memcached_corpus_converts_and_replays_with_matching_digests(tmp_path):
    assert write_trace_from_npz(CORPUS, tmp_path / "memcached.trace", epochs=2) == 3
    epochs = epochs_of(replay(tmp_path / "memcached.trace"))
    assert len(epochs[1][0]) == 21583
    for numbers, data, meta in epochs.values():
        assert meta["digest"] == combine_digests(numbers, digest_pages(data))


# ---- in pipelines -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["inline", "process"])
def test_file_src_deframe_frame_file_sink_copies_a_stream_byte_for_byte(tmp_path, mode):
    out = tmp_path / "copy"
    Pipeline.parse(f"file-src path={FIXTURE_V2} chunk-size=4096 ! deframe ! frame {NO_HEARTBEAT} "
                   f"! file-sink path={out}") \
        .run(mode=mode, timeout=60)
    assert out.read_bytes() == FIXTURE_V2.read_bytes()


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_trace_src_frame_file_sink_records_a_replayable_trace(tmp_path, mode):
    out = tmp_path / "replayed"
    Pipeline.parse(f"trace-src path={FIXTURE} batch-pages=5 ! frame ! file-sink path={out}").run(mode=mode, timeout=60)
    again = epochs_of(replay(out))
    original = epochs_of(replay(FIXTURE))
    assert sorted(again) == sorted(original)
    for epoch, (numbers, data, meta) in original.items():
        assert again[epoch][0].tolist() == numbers.tolist() and np.array_equal(again[epoch][1], data)
        assert again[epoch][2]["digest"] == meta["digest"]


def test_a_stream_crosses_two_pipelines_over_zmq_with_keys(tmp_path, curve_keys):
    endpoint, out = free_tcp_endpoint(), tmp_path / "received"
    keys = curve_keys
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} timeout=20s secret-key={keys.server_secret} "
                              f"authorized-keys={keys.allowed} ! deframe ! frame {NO_HEARTBEAT} ! file-sink path={out}")
    sender = Pipeline.parse(f"file-src path={FIXTURE_V2} chunk-size=8192 ! zmq-sink endpoint={endpoint} "
                            f"secret-key={keys.client_secret} server-key={keys.server_public}")
    with receiver.start(mode="process") as handle:
        sender.run(mode="process", timeout=60)
        handle.wait(timeout=60)
    assert out.read_bytes() == FIXTURE_V2.read_bytes()


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_the_sender_chain_output_replays_to_the_same_checkpoints(tmp_path, mode):
    write_npz(tmp_path / "rec.npz", epochs=4)
    write_trace_from_npz(tmp_path / "rec.npz", tmp_path / "raw.trace")
    encoded = tmp_path / "encoded.trace"
    Pipeline.parse(f"trace-src path={tmp_path / 'raw.trace'} ! classify ! xor-delta ! rle ! zstd ! frame "
                   f"! file-sink path={encoded}").run(mode=mode, timeout=60)
    original, replayed = epochs_of(replay(tmp_path / "raw.trace")), epochs_of(replay(encoded))
    assert sorted(replayed) == sorted(original) == [1, 2, 3, 4, 5]
    for epoch, (numbers, data, meta) in original.items():
        assert replayed[epoch][0].tolist() == numbers.tolist() and np.array_equal(replayed[epoch][1], data)
        assert replayed[epoch][2]["digest"] == meta["digest"]


def test_trace_src_fuses_with_the_page_consumers_after_it_but_not_with_a_plain_hop():
    def nodes(text: str) -> list[str]:
        return [node.name for node in Pipeline.parse(text).plan().nodes]

    assert nodes(f"trace-src path={FIXTURE} ! classify ! xor-delta ! rle ! zstd ! frame ! null-sink") == \
        ["trace-src0+classify0+xor-delta0+rle0", "zstd0", "frame0", "null-sink0"]
    assert nodes(f"trace-src path={FIXTURE} ! identity ! null-sink") == ["trace-src0", "identity0", "null-sink0"]
    assert nodes(f"trace-src path={FIXTURE} ! classify ! xor-delta workers=2 ! rle workers=2 ! null-sink") == \
        ["trace-src0+classify0", "xor-delta0+rle0", "null-sink0"]                  # shards stay in their workers


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_trace_src_fused_with_the_sender_chain_writes_the_same_stream_as_unfused(tmp_path, mode):
    write_npz(tmp_path / "rec.npz", epochs=4)
    write_trace_from_npz(tmp_path / "rec.npz", tmp_path / "raw.trace")
    chain = (f"trace-src path={tmp_path / 'raw.trace'} batch-pages=7 ! classify ! xor-delta ! rle ! zstd "
             f"! frame {NO_HEARTBEAT}")
    fused = Pipeline.parse(f"{chain} ! file-sink path={tmp_path / 'fused'}")
    result = fused.run(mode=mode, timeout=60)
    apart = Pipeline.parse(f"{chain} ! file-sink path={tmp_path / 'apart'}").run(mode=mode, timeout=60, fuse=False)
    assert (tmp_path / "fused").read_bytes() == (tmp_path / "apart").read_bytes()
    assert result.totals("xor-delta0")["fused_as"] == "trace-src0+classify0+xor-delta0+rle0"
    for element in ("trace-src0", "classify0", "xor-delta0", "rle0"):   # each element's statistics, as apart
        for key in ("batches_in", "pages_in", "bytes_in", "batches_out", "pages_out", "bytes_out", "counters"):
            assert result.totals(element)[key] == apart.totals(element)[key], (element, key)
    counters = result.totals("xor-delta0")["counters"]
    assert counters["hits"] + counters["misses"] == result.totals("classify0")["counters"]["normal"] > 0


def test_trace_src_of_n_workers_replays_one_shard_each_into_lanes_and_the_replica_is_the_same(tmp_path):
    import json
    write_npz(tmp_path / "rec.npz", epochs=4)
    write_trace_from_npz(tmp_path / "rec.npz", tmp_path / "raw.trace")
    trace = f"trace-src path={tmp_path / 'raw.trace'} batch-pages=5"
    sharded = (f"{trace} workers=2 ! classify workers=2 ! xor-delta workers=2 ! rle workers=2 ! zstd workers=2 "
               f"! frame workers=2")
    assert [(n.name, n.workers) for n in Pipeline.parse(f"{sharded} ! zmq-sink endpoint=tcp://127.0.0.1:9 channels=2 "
                                                        f"insecure=true").plan().nodes] == \
        [("trace-src0+classify0+xor-delta0+rle0", 2), ("zstd0", 2), ("frame0+zmq-sink0", 2)]  # no page leaves its worker
    manifests = []
    for sender, lanes in [(f"{trace} ! classify ! xor-delta ! rle ! zstd ! frame", 1), (sharded, 2)]:
        endpoint = ",".join(free_tcp_endpoint() for _ in range(lanes))
        replica = tmp_path / f"replica{lanes}"
        receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} channels={lanes} workers={lanes} timeout=20s "
                                  f"insecure=true ! deframe ! decode ! replica-sink path={replica} fsync=false")
        with receiver.start(mode="process") as handle:
            sent = Pipeline.parse(f"{sender} ! zmq-sink endpoint={endpoint} channels={lanes} insecure=true") \
                .run(mode="process", timeout=60)
            result = handle.wait(timeout=60)
        assert result.statistics[("replica-sink0", 0)]["counters"]["epochs_committed"] == 5
        manifests.append(json.loads((replica / "manifest.json").read_text()))
        if lanes == 2:      # each worker replayed its own shard of every epoch
            pages = [sent.statistics[("trace-src0", worker)]["pages_out"] for worker in range(2)]
            assert all(count > 0 for count in pages)
    assert manifests[0]["image_digest"] == manifests[1]["image_digest"]
    assert manifests[0]["epoch"] == manifests[1]["epoch"] == 5


def test_trace_src_into_needs_a_consumer():
    with pytest.raises(ConfigError, match="no consumer= given"):
        TraceSourceInto(path=str(FIXTURE))


# ---- failure detection -------------------------------------------------------------------------

def watch(source: ZmqSource, seconds: float, push: zmq.Socket | None = None, every: float | None = None) -> list:
    """What the source yields for ``seconds`` (None while it waits), ``push`` sending a message every ``every``."""
    import time
    source.idle_every = 0.01
    seen, stream = [], source.produce()
    ends = time.monotonic() + seconds
    next_send = time.monotonic()
    while time.monotonic() < ends:
        if push is not None and every is not None and time.monotonic() >= next_send:
            push.send(b"beat")
            next_send += every
        item = next(stream)
        seen.append(item if item is None else (Flag(item.flags).name if item.is_control else "data", time.monotonic()))
    return seen


@pytest.fixture
def failover_source():
    endpoint = free_tcp_endpoint()
    source = started(ZmqSource(endpoint=endpoint, failover=True, failover_after="250ms", insecure=True))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(endpoint)
    yield source, push
    push.close(0)
    context.term()
    source.stop()


def test_zmq_src_declares_a_silent_sender_lost_only_after_it_was_heard(failover_source):
    source, push = failover_source
    assert all(item is None for item in watch(source, 0.6))     # nobody yet: nothing to lose
    push.send(b"last words")
    seen = [item for item in watch(source, 0.8) if item is not None]
    assert [name for name, _ in seen] == ["data", "SENDER_LOST"]
    assert seen[1][1] - seen[0][1] >= 0.25
    assert source.counters["senders_lost"] == 1
    push.send(b"back again")      # a returning sender arms the detection again
    assert [name for name, _ in (i for i in watch(source, 0.8) if i is not None)] == ["data", "SENDER_LOST"]


def test_zmq_src_rides_out_gaps_shorter_than_failover_after(failover_source):
    source, push = failover_source
    seen = [item for item in watch(source, 1.2, push, every=0.1) if item is not None]
    assert len(seen) >= 5 and {name for name, _ in seen} == {"data"}


# ---- several channels ------------------------------------------------------------------

def test_a_stream_spread_over_three_channels_with_keys_arrives_byte_for_byte(tmp_path, curve_keys):
    out, keys = tmp_path / "received", curve_keys
    endpoints = ",".join(free_tcp_endpoint() for _ in range(3))
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoints} channels=3 timeout=20s secret-key={keys.server_secret} "
                              f"authorized-keys={keys.allowed} ! deframe ! frame {NO_HEARTBEAT} ! file-sink path={out}")
    sender = Pipeline.parse(f"file-src path={FIXTURE_V2} chunk-size=8192 ! zmq-sink endpoint={endpoints} channels=3 "
                            f"secret-key={keys.client_secret} server-key={keys.server_public}")
    with receiver.start(mode="process") as handle:
        sender.run(mode="process", timeout=60)
        result = handle.wait(timeout=60)
    assert out.read_bytes() == FIXTURE_V2.read_bytes()
    counters = result.statistics[("zmq-src0", 0)]["counters"]
    assert counters["messages"] > 3 and counters["peers_admitted"] == 3   # one authenticated connection per channel


def test_a_replica_fed_over_channels_holds_every_checkpoint_exactly(tmp_path):
    from stages.bench.channels import replica_state
    endpoint = f"ipc://{tmp_path}/channel"
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} channels=4 timeout=20s insecure=true ! deframe resume=true "
                              f"! decode ! replica-sink path={tmp_path / 'replica'} fsync=false")
    sender = Pipeline.parse("test-src epochs=6 pages=300 batch-pages=32 pattern=random resync=true ! classify "
                            f"! xor-delta ! rle ! zstd ! frame ! zmq-sink endpoint={endpoint} channels=4 insecure=true")
    with receiver.start(mode="process") as handle:
        sender.run(mode="process", timeout=60)
        result = handle.wait(timeout=60)
    assert result.statistics[("replica-sink0", 0)]["counters"]["epochs_committed"] == 6
    assert replica_state(tmp_path / "replica", 300) == (6, True)   # test-src resync=true counts epochs 1..6


def test_a_single_channel_sender_into_a_channel_receiver_is_corrupt_data(tmp_path):
    endpoint = f"ipc://{tmp_path}/stream"
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} channels=2 timeout=20s ! null-sink")
    sender = Pipeline.parse(f"file-src path={FIXTURE} ! zmq-sink endpoint={endpoint}")
    with receiver.start(mode="process") as handle:
        sender.run(mode="process", timeout=60)
        with pytest.raises(StageFailed, match=r"channel 0: message of 1 parts, expected an envelope .*channels=2\?"):
            handle.wait(timeout=60)


# ---- lanes: frame workers=N ! zmq-sink channels=N, zmq-src channels=N workers=N ! deframe ---------------------

def lane_senders(endpoint: str, lanes: int, **sink) -> list:
    """The N workers of the fused frame+zmq-sink, started in this process as the runtime starts them."""
    fused = Frame(workers=lanes).fuse(ZmqSink(endpoint=endpoint, channels=lanes, timeout="10s", **sink))
    assert type(fused).__name__ == "FrameZmqSink"
    workers = [type(fused)(**fused.property_values()) for _ in range(lanes)]
    for index, worker in enumerate(workers):
        worker.start(StageContext("frame0+zmq-sink0", index, lanes))
    return workers


def lane_receivers(endpoint: str, lanes: int, **deframe) -> list:
    from stages.framer import Deframe
    fused = ZmqSource(endpoint=endpoint, channels=lanes, workers=lanes, timeout="10s", insecure=True).fuse(
        Deframe(**deframe))
    assert type(fused).__name__ == "ZmqSourceDeframe"
    workers = [type(fused)(**fused.property_values()) for _ in range(lanes)]
    for index, worker in enumerate(workers):
        worker.start(StageContext("zmq-src0+deframe0", index, lanes))
    return workers


def lane_epoch(senders: list, epoch: int, flags: Flag = Flag.NONE, pages: int = 6) -> None:
    """Epoch ``epoch``: its page batches dealt among the lanes (lane 0 gets two), its end to every lane."""
    numbers = np.arange(pages, dtype=np.uint64) + epoch
    batches = [Batch(format=PAGES, epoch=epoch, flags=flags, page_numbers=numbers[i:i + 2],
                     kinds=np.zeros(len(numbers[i:i + 2]), np.uint8), data=np.full((2, PAGE), epoch + i, np.uint8))
               for i in range(0, pages, 2)]
    for index, batch in enumerate(batches):
        feed(senders[index % len(senders) if index else 0], [batch])
    for sender in senders:
        feed(sender, [Batch.control(Flag.EPOCH_END | flags, epoch, pages=pages)])


def merged_until(receivers: list, epoch: int) -> list[Batch]:
    """What the runtime's fan-in after the lanes passes on, up to the merged end of ``epoch``."""
    from pipeline.routing import FanIn
    fan_in, got = FanIn(len(receivers)), []
    streams = [receiver.produce() for receiver in receivers]
    for index, stream in enumerate(streams):
        for batch in stream:
            got.extend(fan_in.push(index, batch))
            if batch is not None and batch.flags & Flag.EPOCH_END and batch.epoch == epoch:
                break
    return got


def open_lanes(lanes: int) -> tuple[str, list, list]:
    """Endpoints, receivers and senders of ``lanes`` lanes over tcp, the layout sent on every lane."""
    endpoint = ",".join(free_tcp_endpoint() for _ in range(lanes))
    receivers, senders = lane_receivers(endpoint, lanes), lane_senders(endpoint, lanes, insecure=True)
    for sender in senders:
        feed(sender, [small_layout()])
    return endpoint, receivers, senders


def test_lanes_commit_an_epoch_only_once_every_lane_delivered_its_part(tmp_path):
    _, receivers, senders = open_lanes(3)
    try:
        lane_epoch(senders, 1)
        lane_epoch(senders, 2, pages=2)     # lanes 1 and 2 have nothing of epoch 2: they commit it empty
        got = merged_until(receivers, 2)
    finally:
        for stage in senders + receivers:
            stage.stop()
    ends = [b for b in got if b.flags & Flag.EPOCH_END]
    assert [(b.epoch, b.meta["pages"]) for b in ends] == [(1, 6), (2, 2)]       # every lane's count, summed
    assert [b.epoch for b in got if not b.is_control] == [1, 1, 1, 2]
    assert got.index(ends[0]) == 4                 # no page of epoch 2 passed before epoch 1's barrier
    identities = {b.meta["stream_id"] for b in got if b.is_control}
    assert len(identities) == 1                    # one stream: every lane carries its identity
    lanes = [receiver._deframe.counters["records"] for receiver in receivers]
    assert all(count >= 3 for count in lanes)      # layout, commits (and pages) on every lane


def test_a_restarted_lane_receiver_resumes_at_the_senders_next_resync_segment(tmp_path):
    endpoint, first, senders = open_lanes(2)
    try:
        lane_epoch(senders, 1)
        assert [b.epoch for b in merged_until(first, 1) if b.flags & Flag.EPOCH_END] == [1]
        for receiver in first:
            receiver.stop()
        second = lane_receivers(endpoint, 2, resume=True)
        try:
            for sender in senders:
                await_receivers_gone(sender._sink)
            lane_epoch(senders, 2)                   # skipped by the new receivers: no header, no layout
            lane_epoch(senders, 3, Flag.RESYNC)      # a new segment on every lane: header, layout, pages
            got = merged_until(second, 3)
        finally:
            for receiver in second:
                receiver.stop()
    finally:
        for sender in senders:
            sender.stop()
    assert [(b.epoch, b.flags) for b in got if b.is_control] == [(1, Flag.LAYOUT), (3, Flag.EPOCH_END | Flag.RESYNC)]
    assert sorted(int(n) for b in got if not b.is_control for n in b.page_numbers) == list(range(3, 9))


def test_a_replica_fed_over_three_lanes_with_keys_holds_every_checkpoint_exactly(tmp_path, curve_keys):
    from stages.bench.channels import replica_state
    keys, endpoint = curve_keys, ",".join(free_tcp_endpoint() for _ in range(3))
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} channels=3 workers=3 timeout=20s "
                              f"secret-key={keys.server_secret} authorized-keys={keys.allowed} ! deframe resume=true "
                              f"! decode ! replica-sink path={tmp_path / 'replica'} fsync=false")
    sender = Pipeline.parse("test-src epochs=6 pages=300 batch-pages=32 pattern=random resync=true ! classify "
                            "! xor-delta ! rle ! zstd workers=2 ! frame workers=3 "
                            f"! zmq-sink endpoint={endpoint} channels=3 secret-key={keys.client_secret} "
                            f"server-key={keys.server_public}")
    with receiver.start(mode="process") as handle:
        sent = sender.run(mode="process", timeout=60)
        result = handle.wait(timeout=60)
    assert result.statistics[("replica-sink0", 0)]["counters"]["epochs_committed"] == 6
    assert replica_state(tmp_path / "replica", 300) == (6, True)
    lanes = [result.statistics[("zmq-src0", lane)]["counters"] for lane in range(3)]
    assert all(lane["peers_admitted"] == 1 and lane["bytes_in"] > 0 for lane in lanes), lanes   # each its own connection
    assert sum(sent.statistics[("frame0", lane)]["counters"]["records"] for lane in range(3)) > 3 * 8
    sent_epochs, received_epochs = sent.epochs.pipeline(), result.epochs.pipeline()
    assert sorted(received_epochs) == list(range(1, 7))     # every epoch's lanes add up to its wire bytes,
    for epoch, values in received_epochs.items():            # the same at both ends, and give the ratio
        assert values["wire_bytes"] == sent_epochs[epoch]["wire_bytes"] > 0
        assert values["ratio"] == values["applied_bytes"] / values["wire_bytes"]


def test_a_lane_sender_into_a_spread_receiver_and_the_reverse_are_refused(tmp_path):
    endpoint = ",".join(free_tcp_endpoint() for _ in range(2))
    for receiving, sending, expected in [
            ("channels=2", "frame workers=2", r"carries lane \d of a stream framed by 2 frame workers"),
            ("channels=2 workers=2", "frame", r"spread over 2 channels by one frame worker")]:
        receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} {receiving} timeout=20s insecure=true ! deframe "
                                  f"! null-sink")
        sender = Pipeline.parse(f"test-src epochs=2 pages=8 ! {sending} ! zmq-sink endpoint={endpoint} channels=2 "
                                f"timeout=2s insecure=true")
        with receiver.start(mode="process") as handle:
            try:
                sender.run(mode="process", timeout=60)
            except StageFailed:
                pass                # the refused receiver may leave the sender without a taker
            with pytest.raises(StageFailed, match=expected):
                handle.wait(timeout=60)


@pytest.mark.parametrize("text,message", [
    ("test-src ! frame workers=2 ! file-sink path={tmp}/x",
     "frame: workers=2 frames one lane per worker: link zmq-sink channels=2 right after it"),
    ("test-src ! frame workers=2 ! zmq-sink endpoint=tcp://127.0.0.1:9 channels=3 insecure=true",
     "frame: workers=2 frames one lane per worker"),
    ("zmq-src endpoint=tcp://127.0.0.1:9 channels=2 workers=2 failover=true insecure=true ! deframe ! null-sink",
     "failover=true is not supported with workers=2"),
    ("zmq-src endpoint=tcp://127.0.0.1:9 channels=2 workers=2 insecure=true ! null-sink",
     "zmq-src: workers=2 carries one lane per worker: deframe right beside it"),
])
def test_lanes_set_up_wrongly_are_config_errors(tmp_path, text, message):
    with pytest.raises((ConfigError, StageFailed), match=message):
        Pipeline.parse(text.format(tmp=tmp_path)).run(mode="inline", timeout=30)


@pytest.mark.parametrize("mode", ["process", "inline"])
def test_lanes_are_acknowledged_under_the_stream_identity_they_share(tmp_path, mode):
    from stages.common.acks import AckListener
    identity = "5a" * 16
    listener = AckListener(f"ipc://{tmp_path}/acks", stream_id=identity)
    endpoint = ",".join(free_tcp_endpoint() for _ in range(2))
    receiver = Pipeline.parse(f"zmq-src endpoint={endpoint} channels=2 workers=2 timeout=20s insecure=true "
                              f"! deframe resume=true ! decode ! replica-sink path={tmp_path / 'replica'} fsync=false "
                              f"ack-endpoint={listener.endpoint}")
    sender = Pipeline.parse(f"test-src epochs=4 pages=64 batch-pages=8 pattern=random resync=true ! classify ! xor-delta "
                            f"! rle ! frame workers=2 stream-id={identity} ! zmq-sink endpoint={endpoint} channels=2 "
                            f"insecure=true")
    try:
        with receiver.start(mode=mode) as handle:
            sender.run(mode=mode, timeout=60)
            handle.wait(timeout=60)
        assert listener.wait_for(4, timeout=20)          # every epoch acknowledged, naming the lanes' identity
        assert listener.counters.get("foreign", 0) == 0
    finally:
        listener.close()
