"""Runtime benchmark: what the process executor costs, beside raw pyzmq measured in the same run.

``pagepipe bench runtime`` or ``python -m benchmarks.runtime``. Four figures,
medians over ``--repeat`` runs, each in process mode:

1. baseline: raw pyzmq PUSH/PULL over ipc:// moving 1 MiB frames between two processes
   (interleaved with the chains, ratios taken per round, as the machine is shared);
2. throughput of ``test-src ! sink`` (one hop, target >= 6 GB/s), ``test-src ! identity ! sink``
   and ``test-src ! identity x3 ! sink`` (target >= 2 GB/s) moving 1 MiB batches the source
   wrote once into shared memory (``StageContext.allocate``): only references cross processes;
   the wall time a pass-through stage adds per batch (chain of 3 against 1, halved; target <= 20 us), each
   in a process of its own (a hop) and co-located (``colocate=chains``: 3 against none, divided by 3);
3. runtime overhead per batch per stage: CPU time of each identity worker per
   batch with one-page batches, where the stage itself does nothing (target <= 100 us);
4. scaling: a CPU-bound stage (zstd level 3 over real memory pages) with
   workers=2 against workers=1 (target >= 1.6 x), and the CPU seconds of the whole
   pipeline (every worker process and the supervisor) for the same work (target: within 10%).

Rates are page bytes per second taken at the sink, from its first to its
last data batch, so process start-up is not counted. CPU seconds per GB of
pages are printed for each stage and for the supervisor; an identity
stage's figure is the runtime's own cost per GB (its stage does nothing).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zmq
import zstandard
from rich.console import Console
from rich.table import Table

from stages.bench.realmemory import find_corpus, read_trace
from pipeline.batch import ANY, ENCODED, PAGES, Batch, Flag, PageKind
from pipeline.bus import RunResult, stage_totals
from pipeline.pipeline import Pipeline
from pipeline.stage import Property, Stage, StageContext
from stages.basic import Identity, TestSource
from stages.common.checks import page_data

MiB = 1 << 20
GB = 1e9
PAGE_SIZE = 4096
PAGES_PER_MiB = MiB // PAGE_SIZE
TARGET_CHAIN_GBPS = 2.0
TARGET_HOP_GBPS = 6.0
TARGET_PASS_THROUGH_US = 20.0
TARGET_OVERHEAD_US = 100.0
TARGET_SCALING = 1.6
TARGET_CPU_RATIO = 1.1


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
    pages_file = Property("str", "", "the pages as a .npy file (``corpus_pages_file``), read instead of decoding "
                                     "the corpus in every run: that one-off cost is no part of the work measured")

    def produce(self) -> Iterator[Batch]:
        real = np.load(self.pages_file, mmap_mode="r") if self.pages_file else _real_pages()
        pages = self.context.allocate(real.shape, np.uint8)  # written once; batches refer to it
        pages[...] = real
        del real
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


def corpus_pages_file(directory: str) -> str:
    """The pages CorpusSource sends, decoded once into a .npy file in ``directory``."""
    path = os.path.join(directory, "corpus-pages.npy")
    np.save(path, _real_pages())
    return path


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
        pages = page_data(batch, self.factory_name).data.cast("B")
        payload = np.frombuffer(self._compressor.compress(pages), dtype=np.uint8)
        offsets = np.full(batch.npages + 1, payload.shape[0], dtype=np.uint64)
        offsets[0] = 0  # the whole frame is filed under the first page
        yield Batch(format=ENCODED, epoch=batch.epoch, sequence=batch.sequence, page_numbers=batch.page_numbers,
                    kinds=np.full(batch.npages, PageKind.FULL, np.uint8), payload=payload, offsets=offsets,
                    meta={"codec": f"zstd-{self.level}"})


# ---- measurements ----------------------------------------------------------

@dataclass
class Run:
    """One process-mode run: rate at the sink, per-stage CPU seconds, the supervisor's, page bytes, processes."""

    rate: float
    stage_cpu: dict[str, float]
    supervisor_cpu: float
    page_bytes: int
    processes: int

    @property
    def total_cpu(self) -> float:
        """CPU seconds of the whole pipeline: every worker process and the supervising one."""
        return sum(self.stage_cpu.values()) + self.supervisor_cpu

    def cpu_per_gb(self) -> dict[str, float]:
        """CPU seconds per GB of pages, per stage (its workers summed) and for the supervisor."""
        gigabytes = max(self.page_bytes, 1) / GB
        return {**{name: cpu / gigabytes for name, cpu in self.stage_cpu.items()},
                "supervisor": self.supervisor_cpu / gigabytes}


def per_node(totals: dict[str, dict]) -> dict[str, dict]:
    """Stage totals by the node that ran them: members of a fused node report the node's CPU and workers each,
    so they count once, under the node's name."""
    nodes: dict[str, dict] = {}
    for name, values in totals.items():
        nodes.setdefault(values.get("fused_as", name), values)
    return nodes


def cpu_seconds_by_node(statistics: dict) -> dict[str, float]:
    """CPU seconds of each node's worker processes (their stage's start on), from a run's statistics."""
    return {name: float(values.get("cpu_seconds", 0.0)) for name, values in per_node(stage_totals(statistics)).items()}


def _sink_rate(stages: list[Stage]) -> tuple[float, RunResult]:
    """Run ``stages`` (the last a RateSink) in process mode; bytes per second at the sink, and the result."""
    run, result = measure(stages)
    return run.rate, result


def measure(stages: list[Stage]) -> tuple[Run, RunResult]:
    """Run ``stages`` (the last a RateSink) in process mode and take its figures.

    CPU seconds are each worker process's own (``time.process_time``, what /proc/PID/stat counts, from its stage's
    start) and the supervising process's (this one's, as ``os.times`` counts it, over the run).
    """
    before = os.times()
    result = Pipeline.chain(*stages).run(mode="process", timeout=600)
    after = os.times()
    counters = result.statistics[(stages[-1].name, 0)]["counters"]
    rate = counters["bytes_after_first"] / max(counters["last"] - counters["first"], 1e-9)
    totals = stage_totals(result.statistics)
    stage_cpu = cpu_seconds_by_node(result.statistics)
    page_bytes = int(totals[stages[-1].name]["pages_in"]) * PAGE_SIZE
    processes = sum(int(values["workers"]) for values in per_node(totals).values())
    supervisor = (after.user + after.system) - (before.user + before.system)
    return Run(rate, stage_cpu, supervisor, page_bytes, processes), result


def _push_frames(endpoint: str, count: int, size: int) -> None:
    frame = np.ones(size, dtype=np.uint8)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = -1
        push.connect(endpoint)
        for _ in range(count):
            push.send(frame.data, copy=False)


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


def chain_run(identities: int, total_bytes: int) -> Run:
    """``test-src ! identity x N ! rate-sink`` moving 1 MiB batches of pages the source wrote once."""
    batches = max(4, total_bytes // MiB)
    stages: list[Stage] = [TestSource(epochs=1, pages=batches * PAGES_PER_MiB, batch_pages=PAGES_PER_MiB,
                                      pattern="zeros")]
    stages += [Identity() for _ in range(identities)] + [RateSink()]
    return measure(stages)[0]


def chain_rate(identities: int, total_bytes: int) -> float:
    return chain_run(identities, total_bytes).rate


def colocated_chain(identities: int, total_bytes: int) -> tuple[float, int]:
    """``test-src ! identity x N ! rate-sink`` with ``colocate=chains`` (one worker process): the rate at the
    sink and the worker processes started."""
    batches = max(4, total_bytes // MiB)
    stages: list[Stage] = [TestSource(epochs=1, pages=batches * PAGES_PER_MiB, batch_pages=PAGES_PER_MiB,
                                      pattern="zeros"), *(Identity() for _ in range(identities)), RateSink()]
    with Pipeline.chain(*stages).start(mode="process", colocate="chains") as handle:
        result = handle.wait(timeout=600)
    counters = result.statistics[(stages[-1].name, 0)]["counters"]
    return counters["bytes_after_first"] / max(counters["last"] - counters["first"], 1e-9), handle.worker_processes


def colocated_pass_through(total_bytes: int, repeat: int) -> dict:
    """Wall time each pass-through stage adds per 1 MiB batch when co-located: identity x3 against none (both
    ``colocate=chains``), divided by 3; medians of ``repeat`` interleaved pairs."""
    pairs = [(colocated_chain(0, total_bytes), colocated_chain(3, total_bytes)) for _ in range(repeat)]
    return {"colocated_pass_through_us": statistics.median((MiB / three - MiB / none) / 3
                                                           for (none, _), (three, _) in pairs) * 1e6,
            "colocated_chain3_gbps": statistics.median(three for _, (three, _) in pairs) / GB,
            "colocated_chain3_processes": pairs[0][1][1]}


def overhead_per_batch(batches: int) -> tuple[float, float]:
    """CPU seconds per batch of an identity worker, and wall seconds per batch at the sink (one-page batches)."""
    stages: list[Stage] = [TestSource(epochs=1, pages=batches, batch_pages=1, pattern="zeros"),
                           Identity(), Identity(), Identity(), RateSink()]
    rate, result = _sink_rate(stages)
    per_batch = [result.statistics[(s.name, 0)]["cpu_seconds"] / result.statistics[(s.name, 0)]["batches_in"]
                 for s in stages[1:4]]
    return statistics.median(per_batch), PAGE_SIZE / rate


def scaling_run(workers: int, epochs: int, pages_file: str = "") -> Run:
    return measure([CorpusSource(epochs=epochs, pages_file=pages_file), ZstdPages(workers=workers), RateSink()])[0]


def scaling_rate(workers: int, epochs: int, pages_file: str = "") -> float:
    return scaling_run(workers, epochs, pages_file).rate


def _median_cpu_per_gb(runs: list[Run]) -> dict[str, float]:
    names = runs[0].cpu_per_gb().keys()
    return {name: statistics.median(run.cpu_per_gb()[name] for run in runs) for name in names}


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
    figures: dict = {}
    with console.status("raw pyzmq baseline and chains of identity stages, interleaved"):
        rounds: list[tuple[float, Run, Run, Run]] = [
            (raw_pyzmq_rate(total), chain_run(0, total), chain_run(1, total), chain_run(3, total))
            for _ in range(args.repeat)]
        figures["pyzmq_gbps"] = statistics.median(raw for raw, *_ in rounds) / GB
        chains = [r[1:] for r in rounds]
        for hops, column in ((0, 0), (1, 1), (3, 2)):
            figures[f"chain{hops}_gbps"] = statistics.median(c[column].rate for c in chains) / GB
        figures["chain3_of_pyzmq"] = statistics.median(r[3].rate / r[0] for r in rounds)
        # what one more pass-through stage adds per batch: the wall time per batch of 3 against 1, halved
        figures["pass_through_us"] = statistics.median((MiB / r[3].rate - MiB / r[2].rate) / 2 for r in rounds) * 1e6
        figures["hop_cpu_per_gb"] = _median_cpu_per_gb([r[1] for r in rounds])
        figures["chain3_cpu_per_gb"] = _median_cpu_per_gb([r[3] for r in rounds])
        figures["chain3_processes"] = rounds[0][3].processes
        identities = [value for name, value in figures["chain3_cpu_per_gb"].items() if name.startswith("identity")]
        figures["pass_through_cpu_us"] = statistics.median(identities) * MiB / GB * 1e6  # CPU per 1 MiB batch
    with console.status("co-located chains of identity stages"):
        figures.update(colocated_pass_through(total, args.repeat))
    with console.status("overhead per batch"):
        overheads = [overhead_per_batch(args.batches) for _ in range(args.repeat)]
        figures["overhead_cpu_us"] = statistics.median(cpu for cpu, _ in overheads) * 1e6
        figures["overhead_wall_us"] = statistics.median(wall for _, wall in overheads) * 1e6
    with console.status("scaling of a CPU-bound stage, workers=1 and 2 interleaved"):
        with tempfile.TemporaryDirectory() as directory:
            pages = corpus_pages_file(directory)
            pairs = [(scaling_run(1, args.epochs, pages), scaling_run(2, args.epochs, pages))
                     for _ in range(args.repeat)]
        figures["zstd_w1_mbps"] = statistics.median(one.rate for one, _ in pairs) / 1e6
        figures["zstd_w2_mbps"] = statistics.median(two.rate for _, two in pairs) / 1e6
        figures["scaling"] = statistics.median(two.rate / one.rate for one, two in pairs)
        figures["scaling_cpu_ratio"] = statistics.median(two.total_cpu / one.total_cpu for one, two in pairs)
        figures["zstd_w1_cpu_per_gb"] = _median_cpu_per_gb([one for one, _ in pairs])
        figures["zstd_w2_cpu_per_gb"] = _median_cpu_per_gb([two for _, two in pairs])
        figures["zstd_w2_processes"] = pairs[0][1].processes

    print_figures(console, figures, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


TARGETS = [  # figure, label, target, unit, higher is better
    ("chain0_gbps", "one hop: test-src ! sink, 1 MiB batches", TARGET_HOP_GBPS, "GB/s", True),
    ("chain3_gbps", "test-src ! identity x3 ! sink, 1 MiB batches", TARGET_CHAIN_GBPS, "GB/s", True),
    ("pass_through_us", "wall time one more pass-through stage adds per 1 MiB batch", TARGET_PASS_THROUGH_US,
     "us", False),
    ("colocated_pass_through_us", "each added pass-through stage, co-located (colocate=chains), per 1 MiB batch",
     TARGET_PASS_THROUGH_US, "us", False),
    ("overhead_cpu_us", "runtime CPU per batch per stage (1-page batches)", TARGET_OVERHEAD_US, "us", False),
    ("scaling", "zstd-3 over real pages, workers=2 / workers=1 throughput", TARGET_SCALING, "x", True),
    ("scaling_cpu_ratio", "zstd-3 whole-pipeline CPU seconds, workers=2 / workers=1", TARGET_CPU_RATIO, "x", False),
]


def print_figures(console: Console, figures: dict, repeat: int) -> None:
    """The figures as a table, CPU seconds per GB per stage, and one met/MISSED line per target."""
    table = Table(title=f"runtime benchmark, process mode, medians of {repeat} "
                        f"({multiprocessing.cpu_count()} cores; corpus {'found' if find_corpus() else 'absent'})")
    for column in ("figure", "value", "target", ""):
        table.add_column(column)
    table.add_row("raw pyzmq, 1 MiB frames over ipc", f"{figures['pyzmq_gbps']:.2f} GB/s", "baseline", "")
    table.add_row("test-src ! identity ! sink, 1 MiB batches", f"{figures['chain1_gbps']:.2f} GB/s", "", "")
    table.add_row("test-src ! identity x3 ! sink, co-located, 1 MiB batches",
                  f"{figures['colocated_chain3_gbps']:.2f} GB/s", "", "")
    table.add_row("CPU of a pass-through worker per 1 MiB batch", f"{figures['pass_through_cpu_us']:.1f} us", "", "")
    table.add_row("wall time per batch at the sink (1-page batches)", f"{figures['overhead_wall_us']:.1f} us", "", "")
    table.add_row("zstd-3 over real pages, workers=1", f"{figures['zstd_w1_mbps']:.0f} MB/s", "", "")
    table.add_row("zstd-3 over real pages, workers=2", f"{figures['zstd_w2_mbps']:.0f} MB/s", "", "")
    for key, label, target, unit, higher in TARGETS:
        value = figures[key]
        met = value >= target if higher else value <= target
        table.add_row(label, f"{value:.2f} {unit}", f"{'>=' if higher else '<='} {target} {unit}",
                      "[green]met[/green]" if met else "[red]missed[/red]")
    console.print(table)
    console.print(f"processes: {figures['chain3_processes']} workers for test-src ! identity x3 ! sink "
                  f"({figures['colocated_chain3_processes']} with colocate=chains), "
                  f"{figures['zstd_w2_processes']} for corpus-src ! zstd workers=2 ! sink; plus the supervising "
                  f"process", markup=False)
    for key, title in (("hop_cpu_per_gb", "one identity hop"), ("chain3_cpu_per_gb", "identity x3"),
                       ("zstd_w1_cpu_per_gb", "zstd workers=1"), ("zstd_w2_cpu_per_gb", "zstd workers=2")):
        shares = ", ".join(f"{name} {value:.3f}" for name, value in figures[key].items())
        console.print(f"CPU seconds per GB, {title}: {shares}", markup=False)
    for key, label, target, unit, higher in TARGETS:
        value = figures[key]
        met = value >= target if higher else value <= target
        gap = abs(value - target) / target
        console.print(f"{'met' if met else 'MISSED'}: {label} {value:.2f} {unit} (target {'>=' if higher else '<='} "
                      f"{target} {unit}; {gap:.0%} {'margin' if met else 'short'})", markup=False, soft_wrap=True)


if __name__ == "__main__":
    raise SystemExit(main())
