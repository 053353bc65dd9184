"""Swap a stage for an experiment: a classifier that sends hot pages RAW, measured against the built-in.

A page rewritten in most checkpoints rarely has a small delta against its last
copy, yet it costs a cache slot, an XOR pass and a run-length pass every time.
``HotPagesRaw`` (the stage below, registered in-process as ``hot-raw``) is
``classify`` plus one statistical rule: once ``warmup`` epochs have passed, a
page written in at least ``share`` of the epochs so far goes RAW (whole,
bypassing the cache). The experiment replays one trace through

    trace-src ! classify ! xor-delta ! rle ! zstd ! frame ! file-sink      (the built-in)
    trace-src ! hot-raw  ! xor-delta ! rle ! zstd ! frame ! file-sink      (the experiment)

and compares wire bytes, the ratio (dirty bytes / wire bytes), wall time
(median, process start-up and trace decoding included) and the cache's hit rate; both outputs are
decoded into replicas that must be identical (exit status 0 only then). The
built-in chain runs fused; the experiment's stage is never swallowed by fusion
(merging stages never changes results), so its counters show under its name.

The trace is the shared memcached corpus when found (``--source corpus``,
see ``stages.bench.realmemory.find_corpus``), else a built-in workload.

    python examples/custom_stage.py --share 0.6 --mode process
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.batch import KIND_NORMAL, KIND_RAW, Batch, Flag
from pipeline.errors import PagepipeError
from pipeline.pipeline import Pipeline
from pipeline.registry import register
from pipeline.stage import Property, StageContext
from stages.bench.realmemory import find_corpus
from stages.classify import Classify
from stages.common.replica_store import load_replica
from stages.transport import write_trace_from_npz


@register
class HotPagesRaw(Classify):
    """classify, and send RAW the pages rewritten in most epochs: their deltas rarely pay."""

    factory_name = "hot-raw"
    description = "classify, plus RAW for pages written in at least `share` of the epochs so far"
    share = Property("float", 0.75, "Fraction of epochs a page must be written in to go RAW", minimum=0, maximum=1)
    warmup = Property("int", 4, "Epochs watched before any page goes RAW", minimum=1)

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.writes = np.zeros(0, np.uint32)  # per page number: epochs it was written in
        self.epochs = 0
        self.counters["hot"] = 0

    def classified_kinds(self, batch: Batch) -> np.ndarray:
        kinds = super().classified_kinds(batch)
        pages = batch.page_numbers.astype(np.intp)
        if pages.size and pages.max() >= self.writes.size:
            grown = np.zeros(max(int(pages.max()) + 1, 2 * self.writes.size), np.uint32)
            grown[:self.writes.size] = self.writes
            self.writes = grown
        self.writes[pages] += 1  # a page appears at most once per epoch
        if self.epochs >= self.warmup:
            hot = (kinds == KIND_NORMAL) & (self.writes[pages] >= self.share * (self.epochs + 1))
            kinds[hot] = KIND_RAW
            self.count(zero=0, raw=int(hot.sum()), pages=0)  # moved from normal to raw
            self.counters["hot"] += int(hot.sum())
        return kinds

    def flush(self, marker: Batch) -> tuple:
        self.epochs += bool(marker.flags & Flag.EPOCH_END)
        return ()


# ---- the measurement ------------------------------------------------------------------------------------------------

def make_trace(args: argparse.Namespace, directory: Path) -> tuple[Path, str]:
    """The trace to replay, and what it is."""
    trace = directory / "source.trace"
    corpus = find_corpus() if args.source == "corpus" else None
    if args.source == "corpus" and corpus is None:
        print("corpus not found: using the kv workload instead", file=sys.stderr)
    if corpus is not None:
        epochs = write_trace_from_npz(corpus, trace, epochs=args.epochs)
        return trace, f"memcached corpus, {epochs} epochs"
    Pipeline.parse(f"workload-src kind={args.workload} size={args.size} seconds={args.seconds}s rate=200 "
                   f"! frame ! file-sink path={trace}").run(mode="inline", timeout=300)
    return trace, f"{args.workload} workload, {args.seconds} s"


def run_chain(classifier: str, trace: Path, out: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """Seconds (median of ``--repeats``) and the last run's per-element totals."""
    seconds, totals = [], {}
    for _ in range(args.repeats):
        pipeline = Pipeline.parse(f"trace-src path={trace} preload=true ! {classifier} ! xor-delta "
                                  f"cache={args.cache} ! rle ! zstd ! frame ! file-sink path={out}")
        started = time.perf_counter()
        result = pipeline.run(mode=args.mode, timeout=600)
        seconds.append(time.perf_counter() - started)
        totals = {name: result.totals(name) for name in ("trace-src0", classifier.split()[0] + "0", "xor-delta0")}
    return statistics.median(seconds), totals


def replica_of(stream: Path, directory: Path) -> dict[str, np.ndarray]:
    Pipeline.parse(f"file-src path={stream} ! deframe ! decode ! replica-sink path={directory} fsync=false").run(
        mode="inline", timeout=600)
    return load_replica(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("corpus", "workload"), default="corpus")
    parser.add_argument("--epochs", type=int, default=40, help="corpus epochs to replay (after the base)")
    parser.add_argument("--workload", choices=("kv", "sim", "log"), default="kv", help="workload without corpus")
    parser.add_argument("--size", default="16MiB", help="workload memory")
    parser.add_argument("--seconds", type=float, default=1.0, help="workload duration")
    parser.add_argument("--share", type=float, default=0.75, help="hot-raw share")
    parser.add_argument("--warmup", type=int, default=4, help="hot-raw warmup epochs")
    parser.add_argument("--cache", default="32MiB", help="xor-delta cache")
    parser.add_argument("--mode", choices=("inline", "process"), default="process")
    parser.add_argument("--repeats", type=int, default=3, help="runs per chain (the median time is shown)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be at least 1")
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # one line per row in logs
    try:
        with tempfile.TemporaryDirectory(prefix="custom-stage-") as folder:
            directory = Path(folder)
            trace, what = make_trace(args, directory)
            chains = {"built-in classify": "classify",
                      "hot-raw": f"hot-raw share={args.share} warmup={args.warmup}"}
            table = Table(title=f"classify vs hot-raw on the {what} ({args.mode} mode)", title_justify="left")
            for column in ("classifier", "wire bytes", "ratio", "seconds", "RAW pages", "cache hit rate", "fused as"):
                table.add_column(column, justify="left" if column in ("classifier", "fused as") else "right")
            replicas = []
            for label, classifier in chains.items():
                out = directory / f"{classifier.split()[0]}.stream"
                seconds, totals = run_chain(classifier, trace, out, args)
                source, classify, cache = totals.values()
                dirty, wire = source["pages_out"] * 4096, out.stat().st_size
                hits, misses = cache["counters"]["hits"], cache["counters"]["misses"]
                table.add_row(label, f"{wire:,}", f"{dirty / max(wire, 1):.2f}", f"{seconds:.2f}",
                              f"{classify['counters']['raw']:,}", f"{hits / max(hits + misses, 1):.1%}",
                              classify.get("fused_as", "-"))
                replicas.append(replica_of(out, directory / f"{classifier.split()[0]}.replica"))
            console.print(table)
            same = replicas[0].keys() == replicas[1].keys() and all(
                np.array_equal(replicas[0][name], replicas[1][name]) for name in replicas[0])
            console.print("replicas identical" if same else "[red]replicas differ[/red]")
            return 0 if same else 1
    except PagepipeError as exc:
        print(f"custom_stage: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # process mode: worker processes re-import this script and find HotPagesRaw in it
    sys.exit(main())
