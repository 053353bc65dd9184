"""Peer-attack cases of issue 10 against a receiver (deframe resume=true ! decode ! replica-sink), one
process per case so its memory is measured alone.

Each case starts a receiver that follows an honest stream (its first epoch
committed), prepares the attacker's messages, measures the receiver's resident
memory, sends the attack, and
reports: the peak resident memory above that idle size (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``), the error the receiver raised
(only CorruptData is acceptable), the epochs of the attacker committed (must
be 0) and whether the honest stream's epoch still commits afterwards where the
attack left the stream readable. ``python -m stages.bench.fuzz_attacks CASE``
prints one case's result as JSON; ``pagepipe bench fuzz`` runs them all.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.batch import Batch, PageKind
from pipeline.errors import CorruptData
from pipeline.stage import StageContext
from stages.common import wire
from stages.common.replica_store import IMAGE, read_manifest
from stages.entropy import Decode
from stages.framer import Deframe
from stages.replica import ReplicaSink

PAGE = 4096
HONEST = bytes(range(1, 17))
ATTACKER = bytes(range(101, 117))
_QUIET = StageContext("attack", post=lambda kind, **fields: None)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Receiver:
    """deframe (resume) ! decode ! replica-sink, inline."""

    def __init__(self, replica: Path, resume: bool = True):
        self.sink = ReplicaSink(path=str(replica), fsync=False)
        self.stages = [Deframe(resume=resume), Decode(), self.sink]
        for stage in self.stages:
            stage.start(_QUIET)

    def feed(self, data: bytes) -> None:
        """One message, each batch carried to the end of the chain before the next is made (as the
        runtime's bounded queues do)."""
        self._through(0, Batch(format="stream", payload=np.frombuffer(data, dtype=np.uint8)))

    def _through(self, index: int, batch: Batch) -> None:
        if index < len(self.stages):
            for out in self.stages[index].handle(batch):
                self._through(index + 1, out)

    def stop(self) -> None:
        for stage in self.stages:
            stage.stop()


class StreamWriter:
    """Hand-built v2 records of one stream (what an attacker with pagepipe's own code can send)."""

    def __init__(self, identity: bytes, segment: int = 0, page_size: int = PAGE):
        self.header = wire.StreamHeader(page_size, 16 << 20, identity, "", segment)
        self.sequence = 0
        self.checksums: list[int] = []
        self.entries = 0
        self.layout_digest = 0

    def start(self) -> bytes:
        return wire.encode_stream_header(self.header)

    def record(self, record_type: int, epoch: int, body: list, flags: int = 0) -> bytes:
        parts, checksum = wire.encode_record(record_type, flags, epoch, self.sequence, body, self.header.checksum_seed)
        self.sequence += 1
        if record_type in (wire.RecordType.PAGES, wire.RecordType.ENCODED):
            self.checksums.append(checksum)
        if record_type == wire.RecordType.LAYOUT:
            self.layout_digest = wire.layout_digest(body)
        return b"".join(bytes(memoryview(part).cast("B")) for part in parts)

    def layout(self, epoch: int, npages: int) -> bytes:
        return self.record(wire.RecordType.LAYOUT, epoch,
                           wire.layout_body([{"name": "heap", "start": 0, "first_page": 0, "npages": npages}], {}))

    def pages(self, epoch: int, numbers: np.ndarray, kinds: np.ndarray, data: np.ndarray | None,
              flags: int = 0) -> bytes:
        self.entries += numbers.shape[0]
        return self.record(wire.RecordType.PAGES, epoch, wire.pages_body(numbers, kinds, data), flags)

    def commit(self, epoch: int, digest: int, flags: int = 0) -> bytes:
        body = wire.commit_body(wire.Commit(self.entries, len(self.checksums), wire.stream_digest(self.checksums),
                                            digest, None, None, {}, self.layout_digest))
        self.entries, self.checksums = 0, []
        return self.record(wire.RecordType.EPOCH_COMMIT, epoch, body, flags)


def _full_epoch(writer: StreamWriter, epoch: int, memory: np.ndarray, flags: int = 0) -> bytes:
    from stages.common.pages import combine_digests, digest_pages
    numbers = np.arange(memory.shape[0], dtype=np.uint64)
    kinds = np.full(numbers.shape[0], PageKind.NORMAL, dtype=np.uint8)
    return writer.pages(epoch, numbers, kinds, memory, flags) + \
        writer.commit(epoch, combine_digests(numbers, digest_pages(memory)), flags)


def _honest_start(replica: Path) -> tuple[Receiver, StreamWriter, np.ndarray]:
    memory = np.random.default_rng(1).integers(0, 256, (16, PAGE), dtype=np.uint8)
    receiver = Receiver(replica)
    honest = StreamWriter(HONEST)
    receiver.feed(honest.start() + honest.layout(1, 16) + _full_epoch(honest, 1, memory))
    assert receiver.sink.counters["epochs_committed"] == 1
    return receiver, honest, memory


def _attacker_segment(epoch: int, npages: int, page_size: int = PAGE) -> tuple[StreamWriter, bytes]:
    attacker = StreamWriter(ATTACKER, page_size=page_size)
    return attacker, attacker.start() + attacker.layout(epoch, npages)


def zero_entries(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """One 900 KB PAGES record of 100,000 ZERO entries, an epoch that never commits."""
    attacker, data = _attacker_segment(999_999, 100_000)
    numbers = np.arange(100_000, dtype=np.uint64)
    return [data + attacker.pages(999_999, numbers, np.full(100_000, PageKind.ZERO, np.uint8), None,
                                  int(wire.RecordFlag.RESYNC))]


def zero_flood(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """192 MiB of payload-free ZERO entries in 16 MiB records, an epoch that never commits (512-byte
    pages, so that the layout fits the disk and the entries reach the replica-sink)."""
    per_record = (16 << 20) // 9 - 8
    attacker, data = _attacker_segment(999_999, 12 * per_record, page_size=512)
    messages = [data]
    for index in range(12):
        numbers = np.arange(index * per_record, (index + 1) * per_record, dtype=np.uint64)
        messages.append(attacker.pages(999_999, numbers, np.full(per_record, PageKind.ZERO, np.uint8), None))
    return messages


def _encoded_record(attacker: StreamWriter, chain: str, count: int, raw_size: int, payload: bytes,
                    lengths: np.ndarray) -> bytes:
    attacker.entries += count
    body = [*wire.encoded_body(np.arange(count, dtype=np.uint64), np.full(count, PageKind.FULL, np.uint8),
                               np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64),
                               np.frombuffer(payload, dtype=np.uint8), chain, raw_size)]
    return attacker.record(wire.RecordType.ENCODED, 999_999, body)


def zstd_bomb(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """An 860 KB zstd record that would decompress to 256 MiB."""
    import zstandard
    count = 65536
    payload = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(count * PAGE))
    attacker, data = _attacker_segment(999_999, count)
    return [data + _encoded_record(attacker, "native+zstd", count, count * PAGE, payload,
                                   np.full(count, PAGE, dtype=np.uint64))]


def lz4_claim(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """An lz4 record claiming a raw size of 2.3 GiB."""
    count = int(2.3 * (1 << 30)) // PAGE
    attacker, data = _attacker_segment(999_999, count)
    return [data + _encoded_record(attacker, "native+lz4", count, count * PAGE, b"\x00" * 64,
                                   np.full(count, PAGE, dtype=np.uint64))]


def injection(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """A complete, valid baseline epoch 999999 from another stream, as pagepipe's own Frame writes it."""
    attacker, data = _attacker_segment(999_999, 16)
    return [data + _full_epoch(attacker, 999_999, np.full((16, PAGE), 0xAA, dtype=np.uint8),
                               int(wire.RecordFlag.RESYNC))]


def fake_layout(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """Inside the honest stream (its identity known, so checksums recomputed): a layout of 13 million pages
    before a delta epoch whose commit names the true layout."""
    true_layout = honest.layout_digest
    forged = honest.layout(2, 13_000_000)
    honest.layout_digest = true_layout
    numbers = np.array([0], dtype=np.uint64)
    return [forged, honest.pages(2, numbers, np.array([PageKind.NORMAL], np.uint8), memory[:1]) +
            honest.commit(2, 0)]


def stop_message(honest: StreamWriter, memory: np.ndarray) -> list[bytes]:
    """40 bytes: PAGEPIPE and zeros."""
    return [b"PAGEPIPE" + bytes(32)]


CASES: dict[str, Callable[[StreamWriter, np.ndarray], list[bytes]]] = {
    "zero-entries": zero_entries, "zero-flood": zero_flood, "zstd-bomb": zstd_bomb, "lz4-claim": lz4_claim,
    "injection": injection, "fake-layout": fake_layout, "stop-message": stop_message,
}


def run_case(name: str) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        replica = Path(directory) / "replica"
        receiver, honest, memory = _honest_start(replica)
        messages = CASES[name](honest, memory)
        image_size = (replica / IMAGE).stat().st_size
        idle = _status("VmRSS")
        _reset_peak()
        error = None
        try:
            for message in messages:
                receiver.feed(message)
        except Exception as exc:        # reported: only CorruptData is acceptable
            error = exc
        peak = _status("VmHWM")
        manifest = read_manifest(replica)
        result = {
            "case": name, "idle_mib": round(idle / 2**20, 1), "rss_above_idle_mib": round((peak - idle) / 2**20, 1),
            "error": f"{error.__class__.__name__}: {str(error)[:160]}" if error else None,
            "error_ok": error is None or isinstance(error, CorruptData),
            "attacker_epochs_committed": int(manifest["epoch"] != 1),
            "epochs_refused": receiver.sink.counters["epochs_refused"],
            "image_grew": (replica / IMAGE).stat().st_size != image_size,
        }
        receiver.stop()
    return result


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1])))
