"""Runtime benchmark: what the process executor costs, beside raw pyzmq measured in the same run.

``pagepipe bench runtime`` or ``python -m benchmarks.runtime``. Four figures,
medians over ``--repeat`` runs, each in process mode:

1. baseline: raw pyzmq PUSH/PULL over ipc:// moving 1 MiB frames between two processes
   (interleaved with the chains, ratios taken per round, as the machine is shared);
2. throughput of ``test-src ! identity x3 ! sink`` moving 1 MiB batches (target >= 2 GB/s),
   and of ``test-src ! identity ! sink`` for comparison;
3. runtime overhead per batch per stage: CPU time of each identity worker per
   batch with one-page batches, where the stage itself does nothing (target <= 100 us);
4. scaling: a CPU-bound stage (zstd level 3 over real memory pages) with
   workers=2 against workers=1 (target >= 1.6 x).

Rates are page bytes per second taken at the sink, from its first to its
last data batch, so process start-up is not counted.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zmq
import zstandard
from rich.console import Console
from rich.table import Table

from stages.bench.realmemory import find_corpus, read_trace
from pipeline.batch import ANY, ENCODED, PAGES, Batch, Flag, PageKind
from pipeline.bus import RunResult
from pipeline.pipeline import Pipeline
from pipeline.stage import Property, Stage, StageContext
from stages.basic import Identity, TestSource
from stages.common.checks import page_data

MiB = 1 << 20
GB = 1e9
PAGE_SIZE = 4096
PAGES_PER_MiB = MiB // PAGE_SIZE
TARGET_CHAIN_GBPS = 2.0
TARGET_OVERHEAD_US = 100.0
TARGET_SCALING = 1.6


class RateSink(Stage):
    """Sink that times its data batches: page bytes after the first batch, over the time since it arrived."""

    factory_name = "rate-sink"
    description = "benchmark sink: measures the rate data arrives at"
    input_caps = (ANY,)
    output_caps = None

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.counters.update(first=0.0, last=0.0, bytes_after_first=0, batches=0)

    def process(self, batch: Batch) -> Iterable[Batch]:
        now = time.monotonic()
        if self.counters["batches"] == 0:
            self.counters["first"] = now
        else:
            self.counters["bytes_after_first"] += batch.npages * batch.page_size
        self.counters["last"] = now
        self.counters["batches"] += 1
        return ()


class CorpusSource(Stage):
    """Real memory pages in batches, ``epochs`` times over: the corpus's non-zero pages.

    Zero pages are left out because the pipeline classifies them ZERO before
    any codec sees them; what reaches an entropy stage is non-zero memory.
    """

    factory_name = "corpus-src"
    description = "benchmark source: the corpus's pages, or heap-like synthetic pages without it"
    output_caps = PAGES
    epochs = Property("int", 2, "passes over the pages", minimum=1)
    batch_pages = Property("int", PAGES_PER_MiB, "pages per batch", minimum=1)

    def produce(self) -> Iterator[Batch]:
        pages = _real_pages()
        sequence = 0
        for epoch in range(self.epochs):
            for first in range(0, pages.shape[0], self.batch_pages):
                chunk = pages[first:first + self.batch_pages]
                sequence += 1
                yield Batch(format=PAGES, epoch=epoch, sequence=sequence, page_numbers=np.arange(
                    first, first + chunk.shape[0], dtype=np.uint64), kinds=np.zeros(chunk.shape[0], np.uint8),
                    data=chunk)
            sequence += 1
            yield Batch.control(Flag.EPOCH_END, epoch, sequence=sequence)
        yield Batch.control(Flag.END_OF_STREAM, self.epochs - 1, sequence=sequence + 1)


def _real_pages() -> np.ndarray:
    corpus = find_corpus()
    if corpus is not None:
        base = read_trace(corpus, max_epochs=0).base
        return base[base.any(axis=1)]
    generator = np.random.default_rng(0)
    pages = np.zeros((8192, PAGE_SIZE // 8), dtype=np.uint64)
    used = generator.random(pages.shape) < 0.3
    pages[used] = generator.integers(0, 1 << 20, size=int(used.sum()), dtype=np.uint64)
    return pages.view(np.uint8)


class ZstdPages(Stage):
    """CPU-bound stand-in for the real zstd stage: each batch's pages as one zstd frame."""

    factory_name = "zstd-pages"
    description = "benchmark stage: zstd over each batch's page data"
    input_caps = (PAGES,)
    output_caps = ENCODED
    level = Property("int", 3, "zstd level", minimum=1, maximum=22)

    def start(self, context: StageContext) -> None:
        super().start(context)
        self._compressor = zstandard.ZstdCompressor(level=self.level)

    def process(self, batch: Batch) -> Iterable[Batch]:
        pages = page_data(batch, self.factory_name).data.cast("B")  # .data: memoryview(array), typed
        payload = np.frombuffer(self._compressor.compress(pages), dtype=np.uint8)
        offsets = np.full(batch.npages + 1, payload.shape[0], dtype=np.uint64)
        offsets[0] = 0  # the whole frame is filed under the first page
        yield Batch(format=ENCODED, epoch=batch.epoch, sequence=batch.sequence, page_numbers=batch.page_numbers,
                    kinds=np.full(batch.npages, PageKind.FULL, np.uint8), payload=payload, offsets=offsets,
                    meta={"codec": f"zstd-{self.level}"})


# ---- measurements ----------------------------------------------------------

def _sink_rate(stages: list[Stage]) -> tuple[float, RunResult]:
    """Run ``stages`` (the last a RateSink) in process mode; bytes per second at the sink, and the result."""
    result = Pipeline.chain(*stages).run(mode="process", timeout=600)
    counters = result.statistics[(stages[-1].name, 0)]["counters"]
    return counters["bytes_after_first"] / max(counters["last"] - counters["first"], 1e-9), result


def _push_frames(endpoint: str, count: int, size: int) -> None:
    frame = np.ones(size, dtype=np.uint8)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = -1
        push.connect(endpoint)
        for _ in range(count):
            push.send(frame.data, copy=False)  # .data: memoryview(frame), typed


def raw_pyzmq_rate(total_bytes: int, size: int = MiB) -> float:
    """Bytes per second of raw pyzmq PUSH -> PULL over ipc:// between two processes."""
    count = max(2, total_bytes // size)
    endpoint = f"ipc:///tmp/pagepipe-bench-{multiprocessing.current_process().pid}"
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.bind(endpoint)
        sender = multiprocessing.get_context("forkserver").Process(target=_push_frames, args=(endpoint, count, size))
        sender.start()
        try:
            pull.recv(copy=False)
            began = time.monotonic()
            for _ in range(count - 1):
                pull.recv(copy=False)
            elapsed = time.monotonic() - began
        finally:
            sender.join(10)
            sender.kill()
    return (count - 1) * size / elapsed


def chain_rate(identities: int, total_bytes: int) -> float:
    batches = max(4, total_bytes // MiB)
    stages: list[Stage] = [TestSource(epochs=1, pages=batches * PAGES_PER_MiB, batch_pages=PAGES_PER_MiB,
                                      pattern="zeros")]
    stages += [Identity() for _ in range(identities)] + [RateSink()]
    return _sink_rate(stages)[0]


def overhead_per_batch(batches: int) -> tuple[float, float]:
    """CPU seconds per batch of an identity worker, and wall seconds per batch at the sink (one-page batches)."""
    stages: list[Stage] = [TestSource(epochs=1, pages=batches, batch_pages=1, pattern="zeros"),
                           Identity(), Identity(), Identity(), RateSink()]
    rate, result = _sink_rate(stages)
    per_batch = [result.statistics[(s.name, 0)]["cpu_seconds"] / result.statistics[(s.name, 0)]["batches_in"]
                 for s in stages[1:4]]
    return statistics.median(per_batch), PAGE_SIZE / rate


def scaling_rate(workers: int, epochs: int) -> float:
    return _sink_rate([CorpusSource(epochs=epochs), ZstdPages(workers=workers), RateSink()])[0]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures against their targets; 0 when it ran, 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="pagepipe bench runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (medians are reported)")
    parser.add_argument("--megabytes", type=int, default=2048, help="MiB moved per throughput run")
    parser.add_argument("--batches", type=int, default=20000, help="one-page batches per overhead run")
    parser.add_argument("--epochs", type=int, default=16, help="passes over the real pages per scaling run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    console = Console()
    if min(args.repeat, args.megabytes, args.batches, args.epochs) < 1:
        console.print("[red]error:[/red] --repeat, --megabytes, --batches and --epochs must be at least 1")
        return 2
    total = args.megabytes * MiB
    figures: dict[str, float] = {}
    with console.status("raw pyzmq baseline and chains of identity stages, interleaved"):
        chains = [(raw_pyzmq_rate(total), chain_rate(3, total), chain_rate(1, total)) for _ in range(args.repeat)]
        figures["pyzmq_gbps"] = statistics.median(raw for raw, _, _ in chains) / GB
        figures["chain3_gbps"] = statistics.median(three for _, three, _ in chains) / GB
        figures["chain1_gbps"] = statistics.median(one for _, _, one in chains) / GB
        figures["chain3_of_pyzmq"] = statistics.median(three / raw for raw, three, _ in chains)
    with console.status("overhead per batch"):
        overheads = [overhead_per_batch(args.batches) for _ in range(args.repeat)]
        figures["overhead_cpu_us"] = statistics.median(cpu for cpu, _ in overheads) * 1e6
        figures["overhead_wall_us"] = statistics.median(wall for _, wall in overheads) * 1e6
    with console.status("scaling of a CPU-bound stage, workers=1 and 2 interleaved"):
        scalings = [(scaling_rate(1, args.epochs), scaling_rate(2, args.epochs)) for _ in range(args.repeat)]
        figures["zstd_w1_mbps"] = statistics.median(one for one, _ in scalings) / 1e6
        figures["zstd_w2_mbps"] = statistics.median(two for _, two in scalings) / 1e6
        figures["scaling"] = statistics.median(two / one for one, two in scalings)

    table = Table(title=f"runtime benchmark, process mode, medians of {args.repeat} "
                        f"({multiprocessing.cpu_count()} cores; corpus {'found' if find_corpus() else 'absent'})")
    for column in ("figure", "value", "target", ""):
        table.add_column(column)
    chain_fraction = figures["chain3_of_pyzmq"]
    rows = [
        ("raw pyzmq, 1 MiB frames over ipc", f"{figures['pyzmq_gbps']:.2f} GB/s", "baseline", None),
        ("test-src ! identity x3 ! sink, 1 MiB batches", f"{figures['chain3_gbps']:.2f} GB/s "
         f"({chain_fraction:.0%} of pyzmq)", f">= {TARGET_CHAIN_GBPS} GB/s", figures["chain3_gbps"] >= TARGET_CHAIN_GBPS),
        ("test-src ! identity ! sink, 1 MiB batches", f"{figures['chain1_gbps']:.2f} GB/s", "", None),
        ("runtime CPU per batch per stage (1-page batches)", f"{figures['overhead_cpu_us']:.1f} us",
         f"<= {TARGET_OVERHEAD_US:.0f} us", figures["overhead_cpu_us"] <= TARGET_OVERHEAD_US),
        ("wall time per batch at the sink (1-page batches)", f"{figures['overhead_wall_us']:.1f} us", "", None),
        ("zstd-3 over real pages, workers=1", f"{figures['zstd_w1_mbps']:.0f} MB/s", "", None),
        ("zstd-3 over real pages, workers=2", f"{figures['zstd_w2_mbps']:.0f} MB/s "
         f"({figures['scaling']:.2f} x)", f">= {TARGET_SCALING} x", figures["scaling"] >= TARGET_SCALING),
    ]
    for name, value, target, met in rows:
        table.add_row(name, value, target, "" if met is None else ("[green]met[/green]" if met else "[red]missed[/red]"))
    console.print(table)
    targets = [("identity x3 chain", figures["chain3_gbps"], TARGET_CHAIN_GBPS, "GB/s", True),
               ("runtime CPU per batch per stage", figures["overhead_cpu_us"], TARGET_OVERHEAD_US, "us", False),
               ("zstd-3 workers=2 vs 1", figures["scaling"], TARGET_SCALING, "x", True)]
    for name, figure, goal, unit, higher_is_better in targets:
        met = figure >= goal if higher_is_better else figure <= goal
        gap = abs(figure - goal) / goal
        console.print(f"{'met' if met else 'MISSED'}: {name} {figure:.2f} {unit} "
                      f"(target {'>=' if higher_is_better else '<='} {goal} {unit}; {gap:.0%} "
                      f"{'margin' if met else 'short'})", markup=False)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
