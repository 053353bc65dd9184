"""The wire fuzzer: mutated real streams through deframe + decode + replica-sink.

Seed streams are made by the real sender stages (classify, xor-delta, rle, an
entropy coder or none, frame) from a small memory over several epochs, with a
resync segment and a layout that grows; every epoch's memory is kept (the
*snapshots*). Each run mutates one seed stream and feeds it, in chunks, to a
fresh receiver (deframe, decode, replica-sink with ``fsync=false``, on-error
fail or resync, resume on or off) on a replica directory:

- *natural* mutations: flipped, set, inserted or deleted bytes, truncation,
  chunks repeated or swapped;
- *checksum-forged* mutations: one record's body, type, flags, epoch or
  sequence changed, a record dropped, repeated or swapped, or the layout
  replaced (grown to millions of pages, shrunk, overlapping), after which every
  record checksum is recomputed with the stream's seed (sequence numbers
  renumbered or not) so that only the epoch commit's digests stand guard.

A *violation* is an exception other than CorruptData, a replica that
``verify_replica`` finds inconsistent, one whose pages are not exactly one of the
snapshots (a wrong epoch, or bytes written outside a commit), or a file in the
replica directory that a sink does not write.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.batch import Batch, Flag
from pipeline.errors import CorruptData
from pipeline.stage import Stage, StageContext
from stages.classify import Classify
from stages.common import wire
from stages.common.replica_store import load_replica, read_manifest, verify_replica
from stages.entropy import Decode, Lz4, Zstd
from stages.framer import Deframe, Frame
from stages.replica import ReplicaSink
from stages.rle import RunLengthEncode
from stages.trackers.epochs import EpochStream
from stages.xor_delta import XorDelta

PAGE = 4096
SEED_CHAINS = ["", "native", "native+zstd", "xbzrle+lz4", "xen", "xen+zstd"]
REPLICA_FILES = {"manifest.json", "manifest.json.tmp", "pages.img", "digests.u64", "journal", "lock", "epoch.spill"}
_QUIET = StageContext("fuzz", post=lambda kind, **fields: None)


@dataclass
class SeedStream:
    chain: str
    data: bytes
    snapshots: list[dict[str, bytes]]       # region name -> bytes, after each epoch


@dataclass
class WireTally:
    streams: int = 0
    natural: int = 0
    forged: int = 0
    refused: int = 0                  # runs that ended in CorruptData
    committed: int = 0                # epochs committed over all runs
    violations: list[str] = field(default_factory=list)

    def add(self, other: "WireTally") -> None:
        for name in ("streams", "natural", "forged", "refused", "committed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.violations += other.violations


def _regions(heap_pages: int) -> list[dict]:
    return [{"name": "heap", "start": 0x7F0000000000, "first_page": 0, "npages": heap_pages},
            {"name": "stack", "start": 0x7FFD00000000, "first_page": 32, "npages": 4}]


def make_seed_stream(chain: str, seed: int) -> SeedStream:
    """Six epochs of a 24..28-page memory through the real sender stages; epoch 4 is a resync, epoch 5
    grows the heap."""
    rng = np.random.default_rng(seed)
    run_format, _, layer = chain.partition("+")
    stages: list[Stage] = [Classify()]
    if run_format:
        stages += [XorDelta(cache_pages=64), RunLengthEncode(format=run_format)]
        stages += [Zstd()] if layer == "zstd" else [Lz4()] if layer == "lz4" else []
    stages.append(Frame(max_record=64 << 10))
    for stage in stages:
        stage.start(_QUIET)
    out: list[bytes] = []

    def run(batches: list[Batch]) -> None:
        for stage in stages:
            batches = [produced for batch in batches for produced in stage.handle(batch)]
        out.extend(b.payload.tobytes() for b in batches if b.payload is not None)

    epochs = EpochStream(PAGE, batch_pages=6)
    heap = 24
    memory = np.zeros((36, PAGE), dtype=np.uint8)
    memory[:heap, :1024] = rng.integers(0, 256, (heap, 1024), dtype=np.uint8)
    snapshots = []
    run([Batch.control(Flag.LAYOUT, 1, page_size=PAGE, regions=_regions(heap))])
    for epoch in range(1, 7):
        if epoch == 5:
            heap = 28
            run([Batch.control(Flag.LAYOUT, epoch, page_size=PAGE, regions=_regions(heap))])
        pages = np.concatenate([np.arange(heap), np.arange(32, 36)]).astype(np.uint64)
        resync = epoch == 4
        if epoch > 1 and not resync and epoch != 5:
            pages = np.sort(rng.choice(pages, 8, replace=False))
        for page in pages[:len(pages) // 2]:
            at = int(rng.integers(0, PAGE - 64))
            memory[page, at:at + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
        if epoch == 3:
            memory[pages[-1]] = 0
        run(list(epochs.pages(epoch, pages, memory[pages.astype(np.intp)].copy(), resync)) +
            [epochs.end(epoch, pause=0.0, resync=resync)])
        snapshots.append({"heap": memory[:heap].tobytes(), "stack": memory[32:36].tobytes()})
    run([epochs.end_of_stream(6)])
    for stage in stages:
        stage.stop()
    return SeedStream(chain, b"".join(out), snapshots)


# ---- mutations -------------------------------------------------------------------

def natural_mutation(rng: np.random.Generator, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(int(rng.integers(1, 4))):
        choice = int(rng.integers(0, 6))
        at = int(rng.integers(0, len(data)))
        if choice == 0:
            data[at] ^= 1 << int(rng.integers(0, 8))
        elif choice == 1:
            data[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
        elif choice == 2:
            data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        elif choice == 3:
            del data[at:at + int(rng.integers(1, 64))]
        elif choice == 4:
            del data[at:]
        else:
            length = int(rng.integers(1, 4096))
            data[at:at] = data[int(rng.integers(0, len(data))):][:length]
    return bytes(data)


def _items(data: bytes) -> list:
    return list(wire.RecordReader(1 << 30).feed(data))


def _forged_layout(rng: np.random.Generator) -> bytes:
    choice = int(rng.integers(0, 4))
    if choice == 0:
        regions = [dict(_regions(24)[0], npages=13_000_000), dict(_regions(24)[1], first_page=13_000_000)]
    elif choice == 1:
        regions = _regions(4)
    elif choice == 2:
        regions = [dict(_regions(24)[0], npages=40), _regions(24)[1]]       # overlapping
    else:
        regions = [_regions(24)[0]]                                          # a region dropped
    return b"".join(bytes(memoryview(part).cast("B")) for part in wire.layout_body(regions, {}))


def forged_mutation(rng: np.random.Generator, data: bytes) -> bytes:
    """One record changed, then every checksum recomputed (sequences renumbered unless told not to)."""
    items = _items(data)
    records = [i for i, item in enumerate(items) if isinstance(item, wire.Record)]
    index = int(rng.choice(records))
    record = items[index]
    fields = {"type": record.type, "flags": int(record.flags), "epoch": record.epoch, "sequence": record.sequence,
              "body": bytes(record.body)}
    choice = int(rng.integers(0, 9))
    if choice == 0 and fields["body"]:
        body = bytearray(fields["body"])
        for _ in range(int(rng.integers(1, 4))):
            body[int(rng.integers(0, len(body)))] = int(rng.integers(0, 256))
        fields["body"] = bytes(body)
    elif choice == 1:
        fields["body"] = fields["body"][:int(rng.integers(0, len(fields["body"]) + 1))]
    elif choice == 2:
        fields["type"] = int(rng.choice([1, 2, 3, 4, 5, 6, 0x7FFF, 0x8001, 0x8042]))
    elif choice == 3:
        fields["flags"] = int(rng.choice([0, 1, 2, 3]))
    elif choice == 4:
        fields["epoch"] = int(rng.choice([0, record.epoch - 1, record.epoch + 1, 999_999, (1 << 64) - 1])) % (1 << 64)
    elif choice == 5:
        items[index] = None                                             # dropped
    elif choice == 6:
        items.insert(index, record)                                     # repeated
    elif choice == 7:
        other = int(rng.choice(records))
        items[index], items[other] = items[other], items[index]        # swapped
    else:
        layouts = [i for i in records if items[i].type == wire.RecordType.LAYOUT]
        index = int(rng.choice(layouts))
        record = items[index]
        fields = {"type": record.type, "flags": int(record.flags), "epoch": record.epoch,
                  "sequence": record.sequence, "body": _forged_layout(rng)}
    if items[index] is not None and choice not in (6, 7):
        items[index] = fields
    return _reencode(items, renumber=rng.random() < 0.8)


def _reencode(items: list, renumber: bool) -> bytes:
    parts, seed, sequence = [], 0, 0
    for item in items:
        if item is None:
            continue
        if isinstance(item, wire.StreamHeader):
            parts.append(wire.encode_stream_header(item))
            seed, sequence = item.checksum_seed, 0
            continue
        if isinstance(item, wire.Record):
            item = {"type": item.type, "flags": int(item.flags), "epoch": item.epoch, "sequence": item.sequence,
                    "body": bytes(item.body)}
        record, _ = wire.encode_record(item["type"], item["flags"], item["epoch"],
                                       sequence if renumber else item["sequence"], [item["body"]], seed)
        parts.extend(bytes(memoryview(part).cast("B")) for part in record)
        sequence += 1
    return b"".join(parts)


# ---- one run ---------------------------------------------------------------------

def _chunks(rng: np.random.Generator, data: bytes) -> list[bytes]:
    """The stream cut as a reader may get it: whole, at random points, or in fixed-size chunks."""
    if rng.random() < 0.5:
        cuts = sorted({0, len(data), *(int(c) for c in rng.integers(0, len(data) + 1, 8))})
    else:
        step = int(rng.choice([len(data) or 1, 777, 4096, 65536]))
        cuts = list(range(0, len(data), step)) + [len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def receive(data: bytes, replica: Path, rng: np.random.Generator) -> tuple[int, Exception | None]:
    """Feed a stream to deframe + decode + replica-sink: (epochs committed, what they raised or None)."""
    deframe = Deframe(resume=bool(rng.random() < 0.3))
    sink = ReplicaSink(path=str(replica), fsync=False, verify_on_start=False,
                       on_error="resync" if rng.random() < 0.5 else "fail")
    stages = [deframe, Decode(), sink]
    for stage in stages:
        stage.start(_QUIET)
    error = None
    try:
        for chunk in _chunks(rng, data) + [None]:
            batches = [Batch.control(Flag.END_OF_STREAM, 0, format="stream") if chunk is None else
                       Batch(format="stream", payload=np.frombuffer(chunk, dtype=np.uint8))]
            for stage in stages:
                batches = [out for batch in batches for out in stage.handle(batch)]
    except Exception as exc:        # judged by the caller
        error = exc
    finally:
        for stage in stages:
            stage.stop()
    return sink.counters["epochs_committed"], error


def check_replica(replica: Path, seed: SeedStream) -> str | None:
    """None if the replica is empty or exactly one snapshot of the seed stream, else what is wrong."""
    stray = {p.name for p in replica.iterdir()} - REPLICA_FILES
    if stray:
        return f"stray files in the replica: {sorted(stray)}"
    if not (replica / "manifest.json").exists():
        return None
    report = verify_replica(replica)
    if not report.ok:
        return f"replica inconsistent: {report.problems}"
    regions = {name: array.tobytes() for name, array in load_replica(replica).items()}
    epoch = read_manifest(replica)["epoch"]
    if regions not in seed.snapshots:
        return f"replica at epoch {epoch} is none of the stream's checkpoints"
    return None


def fuzz_wire(runs: int, seed: int, workdir: Path) -> WireTally:
    rng = np.random.default_rng(seed)
    seeds = [make_seed_stream(chain, seed * 100 + index) for index, chain in enumerate(SEED_CHAINS)]
    tally = WireTally()
    replica = workdir / f"replica-{seed}"
    for run in range(runs):
        stream = seeds[run % len(seeds)]
        control = run % 50 == 0             # the intact stream: proves the receiver commits every epoch
        forged = not control and rng.random() < 0.5
        data = stream.data if control else forged_mutation(rng, stream.data) if forged else \
            natural_mutation(rng, stream.data)
        kind = "control" if control else "forged" if forged else "natural"
        label = f"seed {seed} run {run} ({kind}, chain {stream.chain or 'pages'})"
        shutil.rmtree(replica, ignore_errors=True)
        tally.streams += 1
        tally.forged += forged
        tally.natural += not forged and not control
        committed, error = receive(data, replica, rng)
        if control and (error is not None or committed != len(stream.snapshots)):
            tally.violations.append(f"{label}: the intact stream committed {committed} of "
                                    f"{len(stream.snapshots)} epochs ({error!r})")
        tally.committed += committed
        if isinstance(error, CorruptData):
            tally.refused += 1
        elif error is not None:
            tally.violations.append(f"{label}: {error.__class__.__name__}: {error}")
        problem = check_replica(replica, stream)
        if problem:
            tally.violations.append(f"{label}: {problem}")
    shutil.rmtree(replica, ignore_errors=True)
    return tally
