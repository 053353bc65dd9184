"""rle and the sender chain: what classify ! xor-delta ! rle ! zstd sends decodes to the sender's pages.

Round trips run over real memory (the memcached corpus) when it is there, and
always over synthetic pages with zero pages, RAW pages and dense changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from stages.bench.realmemory import find_corpus
from pipeline.batch import DELTAS, ENCODED, Batch, Flag, PageKind
from pipeline.errors import ConfigError, CorruptData
from pipeline.pipeline import Pipeline
from pipeline.testing import Harness, pages_batch
from stages.classify import Classify
from stages.codecs import Encoded, get_codec
from stages.entropy import Decode, Zstd
from stages.framer import deframe_stream
from stages.common.pages import combine_digests, digest_pages
from stages.common.replica_store import load_replica
from stages.rle import RUN_FORMATS, RunLengthEncode
from stages.transport import write_trace_from_npz
from stages.xor_delta import XorDelta

PAGE = 4096
CORPUS = find_corpus()
CORPUS_EPOCHS = range(3, 9)


def corpus_epochs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Real memory: the pages epochs 3-8 touch (renumbered 0..n-1) at the base checkpoint, then their new versions."""
    with np.load(CORPUS, allow_pickle=False) as trace:
        touched = np.unique(np.concatenate([trace[f"epoch{e:03d}_pages"] for e in CORPUS_EPOCHS]))
        yield np.arange(touched.shape[0], dtype=np.uint64), trace["base"][touched]
        for epoch in CORPUS_EPOCHS:
            pages = trace[f"epoch{epoch:03d}_pages"]
            yield np.searchsorted(touched, pages).astype(np.uint64), trace[f"epoch{epoch:03d}_data"]


def synthetic_epochs(npages: int = 96, epochs: int = 6, seed: int = 7) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pages with sparse word writes, some dense rewrites and some zeroed pages, epoch after epoch."""
    rng = np.random.default_rng(seed)
    memory = rng.integers(0, 4, size=(npages, PAGE), dtype=np.uint8)
    memory[::9] = 0
    yield np.arange(npages, dtype=np.uint64), memory.copy()
    for _ in range(epochs):
        dirty = np.sort(rng.choice(npages, size=npages // 3, replace=False))
        for page in dirty:
            action = rng.integers(0, 10)
            if action == 0:
                memory[page] = 0
            elif action == 1:
                memory[page] = rng.integers(0, 256, size=PAGE, dtype=np.uint8)
            else:
                words = rng.choice(PAGE // 8, size=rng.integers(1, 40), replace=False)
                memory[page].view(np.uint64)[words] = rng.integers(0, 2**63, size=words.shape[0], dtype=np.uint64)
        yield dirty.astype(np.uint64), memory[dirty].copy()


SOURCES = {"corpus": corpus_epochs, "synthetic": synthetic_epochs}


def epochs_of(source: str):
    if source == "corpus" and CORPUS is None:
        pytest.skip("memcached corpus not available")
    return SOURCES[source]()


def over_the_wire(batch: Batch) -> Batch:
    """As the receiver sees it: rebuilt from ZeroMQ frames (read-only buffers)."""
    return Batch.from_frames([bytes(frame) for frame in batch.to_frames()])


def apply(batch: Batch, replica: np.ndarray) -> None:
    """What the replica-sink does with a decoded batch: apply its pages onto the receiver's copy."""
    if batch.is_control:
        return
    encoded = Encoded(payload=batch.payload, offsets=batch.offsets, kinds=batch.kinds,
                      codec=batch.meta["codec"], raw_size=batch.meta["raw_size"])
    get_codec(batch.meta["codec"]).decode(encoded, replica, rows=batch.page_numbers.astype(np.int64))


def replicate(epochs, senders: Harness | list[Harness]) -> list[Batch]:
    """Send every epoch through ``senders`` (one harness, or one per shard: pages split by page number); decode,
    apply at a receiver.

    The receiver's copy must equal the sender's memory after every epoch. Returns the batches sent.
    """
    numbers, base = next(epochs)
    memory = base.copy()
    replica = np.full_like(memory, 0xAA)
    decode = Harness(Decode())
    shards = senders if isinstance(senders, list) else [senders]
    sent: list[Batch] = []
    updates = [(numbers, base)] + list(epochs)
    for epoch, (numbers, data) in enumerate(updates, start=1):
        memory[numbers.astype(np.intp)] = data
        outputs = []
        for shard, sender in enumerate(shards):
            mine = numbers % len(shards) == shard
            outputs += sender.push(pages_batch(numbers[mine], data[mine], epoch=epoch))
            outputs += sender.end_epoch()
        for batch in outputs:
            for decoded in decode.push(over_the_wire(batch)):
                apply(decoded, replica)
        sent += outputs
        np.testing.assert_array_equal(replica, memory, err_msg=f"receiver differs after epoch {epoch}")
    return sent


def sender_chain(run_format: str, **xor_delta) -> Harness:
    return Harness(Classify(raw_pages="5-6"), XorDelta(**xor_delta), RunLengthEncode(format=run_format), Zstd())


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("run_format", RUN_FORMATS)
def test_every_epoch_decodes_to_the_sender_pages(run_format, source):
    sent = replicate(epochs_of(source), sender_chain(run_format))
    data = [b for b in sent if not b.is_control]
    assert all(b.meta["codec"] == f"{run_format}+zstd" for b in data)
    kinds = np.concatenate([b.kinds for b in data])
    assert {PageKind.FULL, PageKind.RAW} <= set(kinds.tolist())
    assert np.isin([PageKind.DELTA, PageKind.UNCHANGED], kinds).any()


@pytest.mark.parametrize("run_format", RUN_FORMATS)
def test_small_cache_with_evictions_still_decodes(run_format):
    chain = sender_chain(run_format, cache_pages=20)
    replicate(synthetic_epochs(), chain)
    assert chain.stages[1].counters["evictions"] > 0 and chain.stages[1].counters["hits"] > 0


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("run_format", RUN_FORMATS)
def test_fused_sends_the_same_bytes_as_unfused(run_format, source):
    unfused_chain = sender_chain(run_format)
    classify, xor_delta, rle, _ = unfused_chain.stages
    fused = classify.fuse(xor_delta).fuse(rle)  # one stage: classify + xor-delta + the fused kernel
    fused_chain = Harness(fused, Zstd())
    unfused_sent = replicate(epochs_of(source), unfused_chain)
    fused_sent = replicate(epochs_of(source), fused_chain)
    for plain, joint in zip(unfused_sent, fused_sent, strict=True):
        np.testing.assert_array_equal(plain.page_numbers, joint.page_numbers)
        np.testing.assert_array_equal(plain.kinds, joint.kinds)
        if not plain.is_control:
            np.testing.assert_array_equal(plain.payload, joint.payload)
    for member, apart in zip(fused.fusion.members, unfused_chain.stages, strict=False):  # each element's own counters
        assert member.counters == apart.counters


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_sharded_cache_round_trip(source):
    shards = [Harness(Classify(), XorDelta(cache_pages=64), RunLengthEncode(), Zstd(), worker_index=worker,
                      worker_count=2) for worker in (0, 1)]
    replicate(epochs_of(source), shards)
    for shard in shards:
        xor_delta = shard.stages[1]
        assert xor_delta.cache_slots(PAGE) == 32 and xor_delta.counters["hits"] > 0


def test_empty_page_batch_passes_the_chain_and_decodes_to_nothing():
    sent = sender_chain("native").push_one(pages_batch([]))
    decoded = Harness(Decode()).push_one(over_the_wire(sent))
    assert decoded.npages == 0 and decoded.payload.shape == (0,) and list(decoded.offsets) == [0]


def deltas_batch(current: np.ndarray, reference: np.ndarray, kinds) -> Batch:
    return Batch(format=DELTAS, page_numbers=np.arange(len(kinds), dtype=np.uint64),
                 kinds=np.asarray(kinds, np.uint8), data=current, reference=reference)


@pytest.mark.parametrize("run_format", ["native", "xbzrle"])  # Xen's format has no overflow: it sends 4105 bytes
def test_dense_change_overflows_to_a_whole_page(run_format):
    reference = np.zeros((2, PAGE), np.uint8)
    current = reference.copy()
    current[0, 1::2] = 1            # every other byte: no run format can beat the page
    current[1, 100] = 7
    stage = Harness(RunLengthEncode(format=run_format))
    out = stage.push_one(deltas_batch(current, reference, [PageKind.DELTA, PageKind.DELTA]))
    assert out.format == ENCODED and list(out.kinds) == [PageKind.FULL, PageKind.DELTA]
    np.testing.assert_array_equal(out.payload[:PAGE], current[0])
    assert stage.stage.counters["overflows"] == 1
    assert out.meta == {"codec": run_format, "raw_size": int(out.offsets[-1])}


def test_whole_and_zero_pages_follow_the_encoded_ones():
    current = np.arange(3 * PAGE, dtype=np.uint64).astype(np.uint8).reshape(3, PAGE)
    kinds = [PageKind.ZERO, PageKind.FULL, PageKind.DELTA]
    out = Harness(RunLengthEncode()).push_one(deltas_batch(current, current.copy(), kinds))
    assert list(out.page_numbers) == [2, 1, 0]
    assert list(out.kinds) == [PageKind.UNCHANGED, PageKind.FULL, PageKind.ZERO]
    start, end = int(out.offsets[1]), int(out.offsets[2])
    np.testing.assert_array_equal(out.payload[start:end], current[1])
    assert out.offsets[3] == out.offsets[2]


def test_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match="not one of native, xbzrle, xen"):
        RunLengthEncode(format="gzip")


def test_bad_deltas_batches_are_corrupt_naming_the_stage():
    stage = Harness(RunLengthEncode())
    page = np.zeros((1, PAGE), np.uint8)
    with pytest.raises(CorruptData, match="rle: expected a deltas batch"):
        stage.push(deltas_batch(page, page, [PageKind.DELTA]).with_(format=ENCODED))
    with pytest.raises(CorruptData, match="rle: .*no reference"):
        stage.push(deltas_batch(page, None, [PageKind.DELTA]))
    with pytest.raises(CorruptData, match="rle: .*page kind 0"):
        stage.push(deltas_batch(page, page, [PageKind.NORMAL]))
    with pytest.raises(CorruptData, match="rle: .*reference shape"):
        stage.push(deltas_batch(page, np.zeros((1, 512), np.uint8), [PageKind.DELTA]))


# ---- the real chain through the runtime: trace-src ! classify ! xor-delta ! rle ! zstd ! file-sink ----------

def write_npz_trace(path: Path, epochs) -> tuple[np.ndarray, int]:
    """``epochs`` saved in the corpus .npz layout (one region); returns the final memory and the epoch count."""
    numbers, base = next(epochs)
    arrays = {"base": base, "region_starts": np.array([0x7F0000000000], np.uint64),
              "region_npages": np.array([base.shape[0]], np.uint64)}
    memory = base.copy()
    for index, (numbers, data) in enumerate(epochs):
        arrays[f"epoch{index:03d}_pages"], arrays[f"epoch{index:03d}_data"] = numbers, data
        memory[numbers.astype(np.intp)] = data
    np.savez(path, **arrays)
    return memory, 1 + sum(name.endswith("_pages") for name in arrays)


def receive(stream: Path, npages: int) -> tuple[np.ndarray, int]:
    """Deframe a recorded stream, decode and apply every batch onto a receiver copy, as the receiver does.

    Every epoch's pages must match the content digest the sender put in its end marker.
    Returns the receiver copy and the number of epochs checked.
    """
    replica = np.full((npages, PAGE), 0xAA, dtype=np.uint8)
    decode = Harness(Decode())
    touched: list[np.ndarray] = []
    epochs = 0
    for batch in deframe_stream([stream.read_bytes()]):
        for decoded in decode.push(batch):
            if decoded.flags & Flag.EPOCH_END:
                pages = np.concatenate(touched).astype(np.intp)
                digest = combine_digests(pages.astype(np.uint64), digest_pages(replica[pages]))
                assert digest == decoded.meta["digest"], f"epoch {decoded.epoch} differs from the sender's"
                touched, epochs = [], epochs + 1
            elif not decoded.is_control:
                apply(decoded, replica)
                touched.append(decoded.page_numbers)
    return replica, epochs


REAL_OR_SYNTHETIC = "synthetic" if CORPUS is None else "corpus"


SENDER_NODE = "trace-src0+classify0+xor-delta0+rle0"   # the page consumers fused into the source (TraceSourceInto)


@pytest.mark.parametrize("mode, fuse, workers, fused_as, source", [
    ("inline", True, 1, SENDER_NODE, "synthetic"),
    ("inline", True, 1, SENDER_NODE, REAL_OR_SYNTHETIC),
    ("inline", False, 2, None, REAL_OR_SYNTHETIC),
    ("process", True, 1, SENDER_NODE, REAL_OR_SYNTHETIC),
    ("process", True, 2, "xor-delta0+rle0", REAL_OR_SYNTHETIC),  # classify (1 worker) stays apart from 2 workers
])
def test_sender_chain_through_the_runtime_decodes_to_the_traced_memory(mode, fuse, workers, fused_as, source,
                                                                       tmp_path):
    memory, epoch_count = write_npz_trace(tmp_path / "memory.npz", epochs_of(source))
    trace, sent = tmp_path / "trace.pp", tmp_path / "sent.pp"
    write_trace_from_npz(tmp_path / "memory.npz", trace)
    pipeline = Pipeline.parse(f"trace-src path={trace} ! classify raw-pages=5-6 ! xor-delta workers={workers} "
                              f"cache=256KiB ! rle ! zstd ! frame ! file-sink path={sent}")
    result = pipeline.run(mode=mode, fuse=fuse, timeout=60)
    replica, epochs = receive(sent, memory.shape[0])
    np.testing.assert_array_equal(replica, memory)
    assert epochs == epoch_count
    cache_workers = [stats for (stage, _), stats in result.statistics.items() if stage == "xor-delta0"]
    assert len(cache_workers) == workers  # fused or not, xor-delta reports under its own name
    assert all(stats["counters"]["hits"] > 0 and stats["counters"]["misses"] > 0 for stats in cache_workers)
    assert all(stats.get("fused_as") == fused_as for stats in cache_workers)


def test_format_without_the_page_size_is_a_config_error_naming_the_stage():
    pages = np.zeros((1, 1024), np.uint8)
    batch = deltas_batch(pages, pages, [PageKind.DELTA]).with_(page_size=1024)
    with pytest.raises(ConfigError, match="rle: xbzrle: the format defines only page size 4096"):
        Harness(RunLengthEncode(format="xbzrle")).push(batch)


def test_what_the_sender_chain_records_the_receiver_chain_replicates(tmp_path):
    memory, _ = write_npz_trace(tmp_path / "memory.npz", epochs_of(REAL_OR_SYNTHETIC))
    write_trace_from_npz(tmp_path / "memory.npz", tmp_path / "trace.pp")
    sent, replica = tmp_path / "sent.pp", tmp_path / "replica"
    sender = Pipeline.parse(f"trace-src path={tmp_path / 'trace.pp'} ! classify ! xor-delta cache=256KiB "
                            f"! rle format=xbzrle ! lz4 ! frame ! file-sink path={sent}")
    sender.run(mode="inline", timeout=60)
    receiver = Pipeline.parse(f"file-src path={sent} ! deframe ! decode ! replica-sink path={replica}")
    receiver.run(mode="inline", timeout=60)
    (region,) = load_replica(replica).values()
    np.testing.assert_array_equal(region.reshape(memory.shape), memory)
