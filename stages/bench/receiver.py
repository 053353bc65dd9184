"""Receiver benchmark: replica apply throughput, and checkpoint -> acknowledgement latency.

``pagepipe bench receiver`` (or ``python -m benchmarks.receiver``):

- **apply**: real memory (the corpus trace, else synthetic pages) is run through the
  real sender stages (classify, xor-delta+rle, optionally zstd) once, untimed; then the
  encoded epochs are fed to a ``replica-sink`` and timed from an epoch's first batch to
  its commit. Throughput = page bytes of the epochs / time, beside a plain numpy copy
  of the same bytes measured in the same run. Target: >= 1 GB/s per receiver process.
  Measured with fsync off and on (the durability cost).
- **demo**: runs the demo with its defaults (region-src -> sender processes -> tcp loopback ->
  receiver processes, 10 s at 40 checkpoints/s, replica verified) and reports the checkpoint
  rate (target 40/s), pause, ratio, throughput and the median time from each checkpoint to its
  acknowledgement (aim: under 25 ms).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.bench.realmemory import find_corpus
from pipeline.batch import Batch, Flag
from pipeline.stage import StageContext
from pipeline.units import parse_size
from stages.classify import Classify
from stages.apps.demo import DemoOptions, run_demo
from stages.entropy import Decode, Zstd
from stages.replica import ReplicaSink
from stages.rle import RunLengthEncode
from stages.trackers.epochs import EpochStream
from stages.xor_delta import XorDelta

APPLY_TARGET_GBPS = 1.0
LATENCY_AIM_MS = 25.0


def corpus_epochs(path: Path, max_epochs: int) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """(page count, [(page numbers, pages)]): epoch 1 = the base, then the recorded epochs."""
    with np.load(path) as trace:
        base = trace["base"]
        epochs = [(np.arange(base.shape[0], dtype=np.uint64), base)]
        for index in range(max_epochs - 1):
            key = f"epoch{index:03d}"
            if f"{key}_pages" not in trace:
                break
            epochs.append((trace[f"{key}_pages"].astype(np.uint64), trace[f"{key}_data"]))
    return base.shape[0], epochs


def synthetic_epochs(npages: int, dirty: int, count: int, seed: int = 7) -> tuple[int, list]:
    """A memory of ``npages`` pages; each later epoch rewrites 64 bytes in ``dirty`` random pages."""
    rng = np.random.default_rng(seed)
    memory = np.zeros((npages, 4096), dtype=np.uint8)
    memory[:, :512] = rng.integers(0, 256, (npages, 512), dtype=np.uint8)
    epochs = [(np.arange(npages, dtype=np.uint64), memory.copy())]
    for _ in range(count - 1):
        pages = np.sort(rng.choice(npages, dirty, replace=False)).astype(np.uint64)
        offsets = rng.integers(0, 4096 - 64, dirty)
        for page, offset in zip(pages, offsets):
            memory[page, offset:offset + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
        epochs.append((pages, memory[pages.astype(np.intp)].copy()))
    return npages, epochs


def _run_stage(stage, batches: list[Batch]) -> list[Batch]:
    stage.start(StageContext(stage.factory_name))
    out = [result for batch in batches for result in stage.handle(batch)]
    stage.stop()
    return out


def encode_stream(npages: int, epochs: list, chain: str) -> list[list[Batch]]:
    """The sender's batches per epoch (layout first), through the real sender stages."""
    stream = EpochStream(4096, 256)
    regions = [{"name": "memory", "start": 0, "first_page": 0, "npages": npages}]
    batches = [Batch.control(Flag.LAYOUT, 1, page_size=4096, regions=regions)]
    for epoch, (page_numbers, pages) in enumerate(epochs, start=1):
        batches.extend(stream.pages(epoch, page_numbers, np.ascontiguousarray(pages), resync=False))
        batches.append(stream.end(epoch, pause=0.0))
    run_format, *entropy = chain.split("+")
    stages = [Classify(), XorDelta(cache_pages=npages), RunLengthEncode(format=run_format)]
    if entropy:
        stages += [Zstd(), Decode()]
    for stage in stages:
        batches = _run_stage(stage, batches)
    per_epoch: list[list[Batch]] = [[]]
    for batch in batches:
        per_epoch[-1].append(batch)
        if batch.flags & Flag.EPOCH_END:
            per_epoch.append([])
    return [epoch for epoch in per_epoch if epoch]


def measure_apply(per_epoch: list[list[Batch]], fsync: bool) -> tuple[float, int, int]:
    """Seconds spent applying all epochs after the first, their page bytes, and epochs committed."""
    with tempfile.TemporaryDirectory(prefix="pagepipe-bench-") as directory:
        sink = ReplicaSink(path=directory, fsync=fsync)
        sink.start(StageContext("replica-sink"))
        for batch in per_epoch[0]:
            list(sink.handle(batch))
        elapsed = 0.0
        page_bytes = 0
        for batches in per_epoch[1:]:
            began = time.perf_counter()
            for batch in batches:
                list(sink.handle(batch))
            elapsed += time.perf_counter() - began
            page_bytes += sum(b.npages for b in batches) * 4096
        committed = sink.counters["epochs_committed"]
        sink.stop()
    return elapsed, page_bytes, committed


def memcpy_seconds(nbytes: int, repeat: int) -> float:
    source = np.ones(max(nbytes, 4096), dtype=np.uint8)
    target = np.empty_like(source)
    timings = []
    for _ in range(repeat):
        began = time.perf_counter()
        np.copyto(target, source)
        timings.append(time.perf_counter() - began)
    return statistics.median(timings)


def apply_datasets(choice: str, epochs: int, synthetic_pages: int) -> list[tuple[str, int, list]]:
    """(name, page count, epochs) of the data sets to apply: the corpus trace (small epochs, when
    present) and synthetic memory with large epochs."""
    datasets = []
    corpus = find_corpus() if choice in ("corpus", "all") else None
    if corpus is not None:
        datasets.append((f"corpus {corpus.name}", *corpus_epochs(corpus, epochs)))
    if choice in ("synthetic", "all") or not datasets:
        dirty = synthetic_pages // 8
        datasets.append((f"synthetic {synthetic_pages * 4096 >> 20} MiB, {dirty} dirty pages per epoch",
                         *synthetic_epochs(synthetic_pages, dirty, min(epochs, 11))))
    return datasets


def bench_apply(args: argparse.Namespace) -> list[dict]:
    results = []
    for name, npages, epochs in apply_datasets(args.data, args.epochs, args.synthetic_pages):
        print(f"apply: {name}, {len(epochs)} epochs, chain {args.chain}; encoding (untimed)...", flush=True)
        per_epoch = encode_stream(npages, epochs, args.chain)
        for fsync in (False, True):
            runs = [measure_apply(per_epoch, fsync) for _ in range(args.repeat)]
            seconds = statistics.median(run[0] for run in runs)
            page_bytes, committed = runs[0][1], runs[0][2]
            copy = memcpy_seconds(page_bytes, args.repeat)
            gbps = page_bytes / seconds / 1e9
            verdict = "met" if gbps >= APPLY_TARGET_GBPS else "MISSED"
            print(f"  fsync={str(fsync).lower():5}  {gbps:6.2f} GB/s  ({copy / seconds:.2f} x memcpy, "
                  f"{page_bytes / 2**20:.0f} MiB in {committed - 1} epochs, "
                  f"{seconds / (committed - 1) * 1e3:.2f} ms per epoch)  target >= {APPLY_TARGET_GBPS} GB/s: {verdict}")
            results.append({"data": name, "fsync": fsync, "gbps": gbps, "x_memcpy": copy / seconds})
    return results


def bench_latency(args: argparse.Namespace) -> dict:
    print(f"demo: {args.seconds} s at {args.rate} checkpoints/s, {args.size}, chain {args.chain}...", flush=True)
    result = run_demo(DemoOptions(seconds=args.seconds, rate=args.rate, codec=args.chain, size=parse_size(args.size)),
                      show_progress=False)
    median = result.ack_latency_ms_median
    pause = statistics.median(result.pauses_ms) if result.pauses_ms else 0.0
    rate_verdict = "met" if result.checkpoints_per_second >= args.rate * 0.95 else "MISSED"
    latency_verdict = "met" if median is not None and median < LATENCY_AIM_MS else "MISSED"
    print(f"  initial full copy {result.initial_sync_seconds:.2f} s; {result.epochs - 1} checkpoints, "
          f"{result.checkpoints_per_second:.1f}/s (target {args.rate:g}/s: {rate_verdict}); "
          f"replica identical: {result.identical}")
    print(f"  pause median {pause:.2f} ms, max {max(result.pauses_ms, default=0):.2f} ms; "
          f"dirty {result.dirty_bytes / result.seconds / 1e6:.1f} MB/s, wire {result.wire_bytes / result.seconds / 1e6:.2f} MB/s, "
          f"ratio {result.ratio:.1f}")
    print(f"  checkpoint -> ack median {median:.1f} ms, p90 {result.ack_latency_ms_p90:.1f} ms over "
          f"{len(result.ack_latencies_ms)} epochs; aim < {LATENCY_AIM_MS} ms: {latency_verdict}")
    return {"median_ms": median, "p90_ms": result.ack_latency_ms_p90, "identical": result.identical,
            "rate": result.checkpoints_per_second, "pause_ms": pause, "ratio": result.ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("all", "corpus", "synthetic"), default="all",
                        help="apply: the corpus trace (when present) and synthetic large epochs (default: both)")
    parser.add_argument("--synthetic-pages", type=int, default=16384, help="apply: synthetic memory size in pages")
    parser.add_argument("--chain", default="native+zstd", help="codec chain of the sender (the demo default)")
    parser.add_argument("--epochs", type=int, default=41, help="epochs to apply (the first is the baseline)")
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    parser.add_argument("--skip", choices=("apply", "latency"), action="append", default=[])
    parser.add_argument("--seconds", type=float, default=10.0, help="latency: demo duration (the demo default)")
    parser.add_argument("--rate", type=float, default=40.0, help="latency: checkpoints per second")
    parser.add_argument("--size", default="64MiB", help="latency: the demo's tracked memory")
    args = parser.parse_args(argv)
    if "apply" not in args.skip:
        bench_apply(args)
    if "latency" not in args.skip:
        if not bench_latency(args)["identical"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
