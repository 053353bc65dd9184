"""Sender-chain benchmark: dirty-page throughput and compression ratio over real memory.

``pagepipe bench sender`` or ``python -m benchmarks.sender``. Over a recorded
trace (the memcached corpus by default; its first epoch is every tracked page)
it measures, medians over repeats:

- ``direct``: classify ! xor-delta ! rle ! zstd driven by hand in this process
  (classify, xor-delta and rle fused, as the runtime runs them), per codec chain:
  GB/s of dirty-page input per second of this process's CPU time (robust on a
  shared machine; it is what the 2-core budget is spent in) and compression
  ratio (page bytes in / payload bytes out), also without the first
  (whole-memory) epoch;
- ``inline`` and ``process``: the real chain
  ``trace-src ! classify ! xor-delta ! rle ! zstd ! frame ! null-sink`` through
  the runtime over the trace replayed as a trace file (its recorded epochs
  repeated ``--rounds`` times after the whole-memory epoch, so the run is long
  enough to measure), in each configuration of ``--configs`` (the plain
  default, and the variants tried: bigger batches, two zstd workers), the
  best one named. trace-src runs with ``preload=true``: it decodes the whole
  trace file before its first batch, and throughput counts the page bytes it
  emits over the time from the first to the last batch reaching the sink (so
  neither the decoding nor process start-up is counted; the wall time
  including both is reported beside). The runtime fuses trace-src with
  classify ! xor-delta ! rle (``TraceSourceInto``): the pages never cross a
  process boundary, only their encodings do. Baselines in the same run (in
  the first configuration): trace-src ! null-sink and trace-src ! identity !
  null-sink, which show what moving the pages costs the runtime (in process
  mode one and two process hops carrying every page, which trace-src writes
  once into shared memory so that only references move; target for one hop
  >= 6 GB/s; inline next to nothing, as the pages are preloaded). CPU seconds
  per GB of dirty pages are printed for each stage in process mode.

Targets (issue 4): process mode >= 1 GB/s of dirty-page input, and >= 60% of
the same chain's inline throughput (same configuration); native+zstd ratio
>= 1.35 x xbzrle's. Each is printed met/MISSED with its figure (the runtime
ones for the default configuration and for the best one); the exit status is
1 if a target is missed (the runtime ones judged on the best configuration),
2 if the trace is missing or malformed or an option is unknown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from stages.bench.realmemory import RecordedTrace, find_corpus, read_trace
from stages.bench.runtime import cpu_seconds_by_node
from pipeline.batch import Batch, Flag
from pipeline.errors import CorruptData, TransportError
from pipeline.pipeline import Pipeline
from pipeline.stage import Stage, StageContext
from stages.basic import Identity, NullSink
from stages.classify import Classify
from stages.common.checks import array_of, page_data
from stages.entropy import Lz4, Zstd
from stages.framer import Frame
from stages.rle import RunLengthEncode
from stages.transport import TraceSource, write_trace_from_npz
from stages.xor_delta import XorDelta

GB = 1e9
CHAINS = ("native+zstd", "native+lz4", "native", "xbzrle", "xbzrle+zstd", "xen")
RATIO_TARGET = 1.35
THROUGHPUT_TARGET_GBPS = 1.0
PROCESS_SHARE_TARGET = 0.6


@dataclass
class Epoch:
    page_numbers: np.ndarray
    data: np.ndarray


@dataclass
class ChainResult:
    chain: str
    gbps: float
    gbps_after_first_epoch: float
    ratio: float
    ratio_after_first_epoch: float
    bytes_in: int
    bytes_out: int


def trace_epochs(trace: RecordedTrace) -> list[Epoch]:
    """The trace as epochs: first every tracked page (``base``), then each recorded epoch's dirty pages."""
    whole_memory = Epoch(np.arange(trace.base.shape[0], dtype=np.uint64), trace.base)
    return [whole_memory, *(Epoch(pages, data) for pages, data in trace.epochs)]


def epoch_batches(epochs: Sequence[Epoch], batch_pages: int) -> Iterator[tuple[int, Batch]]:
    """(epoch index, batch): PAGES batches of ``batch_pages`` pages, each epoch closed by its EPOCH_END."""
    for index, epoch in enumerate(epochs):
        for start in range(0, epoch.page_numbers.shape[0], batch_pages):
            numbers = epoch.page_numbers[start:start + batch_pages]
            yield index, Batch(epoch=index + 1, page_numbers=numbers, kinds=np.zeros(numbers.shape[0], np.uint8),
                               data=epoch.data[start:start + batch_pages])
        yield index, Batch.control(Flag.EPOCH_END, epoch=index + 1, pages=int(epoch.page_numbers.shape[0]))


def direct_chain(chain: str, cache: str) -> list[Stage]:
    """classify+xor-delta+rle (fused, as the runtime runs them) [! zstd|lz4], started as one worker each."""
    run_format, *entropy = chain.split("+")
    fused = Classify().fuse(XorDelta(cache=cache))
    fused = fused.fuse(RunLengthEncode(format=run_format)) if fused is not None else None
    if fused is None:
        raise RuntimeError("classify, xor-delta and rle no longer fuse")
    stages: list[Stage] = [fused]
    stages += [{"zstd": Zstd, "lz4": Lz4}[name]() for name in entropy]
    for stage in stages:
        stage.start(StageContext(stage.factory_name))
    return stages


@dataclass
class DirectRun:
    """One pass of a direct chain; index 0 = the first (whole-memory) epoch, 1 = the others."""

    seconds: np.ndarray
    bytes_in: np.ndarray
    bytes_out: np.ndarray


def run_direct(chain: str, epochs: Sequence[Epoch], batch_pages: int, cache: str) -> DirectRun:
    stages = direct_chain(chain, cache)
    run = DirectRun(np.zeros(2), np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64))
    for index, batch in epoch_batches(epochs, batch_pages):
        part = int(index > 0)
        started = time.process_time()
        outputs = [batch]
        for stage in stages:
            outputs = [out for item in outputs for out in stage.handle(item)]
        run.seconds[part] += time.process_time() - started
        if not batch.is_control:
            run.bytes_in[part] += page_data(batch, "sender bench").nbytes
            run.bytes_out[part] += sum(int(array_of(out, "payload", "sender bench").shape[0])
                                       for out in outputs if not out.is_control)
    return run


def measure_direct(chain: str, epochs: Sequence[Epoch], batch_pages: int, cache: str, repeats: int) -> ChainResult:
    runs = [run_direct(chain, epochs, batch_pages, cache) for _ in range(repeats)]
    seconds = statistics.median(run.seconds.sum() for run in runs)
    later_seconds = statistics.median(run.seconds[1] for run in runs)
    bytes_in, bytes_out = runs[0].bytes_in, runs[0].bytes_out
    return ChainResult(chain, bytes_in.sum() / seconds / GB, bytes_in[1] / later_seconds / GB,
                       bytes_in.sum() / max(bytes_out.sum(), 1), bytes_in[1] / max(bytes_out[1], 1),
                       int(bytes_in.sum()), int(bytes_out.sum()))


class TimedNullSink(NullSink):
    """null-sink that also notes (wall clock) when the first and the last batch arrived."""

    def start(self, context: StageContext) -> None:
        super().start(context)
        self.counters.update(first_batch=0.0, last_batch=0.0)

    def handle(self, batch: Batch) -> Iterator[Batch]:
        now = time.time()
        self.counters["first_batch"] = self.counters["first_batch"] or now
        self.counters["last_batch"] = now
        return super().handle(batch)


def write_repeated_trace(trace: RecordedTrace, rounds: int, directory: Path) -> Path:
    """A trace file: the whole memory, then the recorded epochs ``rounds`` times over."""
    arrays: dict[str, Any] = {"base": trace.base, "region_starts": trace.region_starts, "region_npages": trace.region_npages}
    for count, (pages, data) in enumerate(epoch for _ in range(rounds) for epoch in trace.epochs):
        arrays[f"epoch{count:03d}_pages"], arrays[f"epoch{count:03d}_data"] = pages, data
    repeated = directory / "repeated.npz"
    np.savez(repeated, **arrays)
    trace_file = directory / "trace.pp"
    write_trace_from_npz(repeated, trace_file)
    repeated.unlink()
    return trace_file


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime chain is set up: pages per trace-src batch, zstd workers."""

    batch_pages: int = 256
    zstd_workers: int = 1


CONFIGS = {
    "default": RuntimeConfig(),
    "batch-pages=1024": RuntimeConfig(batch_pages=1024),
    "zstd-workers=2": RuntimeConfig(zstd_workers=2),
    "batch-pages=1024+zstd-workers=2": RuntimeConfig(batch_pages=1024, zstd_workers=2),
}
"""Configurations the benchmark can try (``--configs``); ``default`` is every stage's plain defaults."""


SENDER_CHAIN = "sender chain"
HOP_ONE = "baseline: one hop"           # trace-src ! null-sink
HOP_TWO = "baseline: two hops"          # trace-src ! identity ! null-sink
HOP_TARGET_GBPS = 6.0
RUNTIME_CHAINS: dict[str, Callable[[str, RuntimeConfig], list[Stage]]] = {
    SENDER_CHAIN: lambda cache, config: [Classify(), XorDelta(cache=cache), RunLengthEncode(),
                                         Zstd(workers=config.zstd_workers), Frame()],
    HOP_TWO: lambda cache, config: [Identity()],
    HOP_ONE: lambda cache, config: [],
}
"""What runs between trace-src and the sink; the baselines show what the source and one or two process hops
cost (the source writes its pages once into shared memory; every hop moves a reference)."""


@dataclass
class RuntimeResult:
    chain: str
    config: str
    mode: str
    gbps: float
    window_seconds: float
    wall_seconds: float
    dirty_bytes: int
    cpu_per_gb: dict[str, float]
    """CPU seconds per GB of dirty pages of each stage's worker processes (process mode; from each stage's start)."""


def run_runtime(trace_file: Path, chain: str, mode: str, cache: str, config: RuntimeConfig,
                page_size: int) -> tuple[float, float, int, dict[str, float]]:
    """One run: (seconds from first to last batch at the sink, wall seconds, page bytes trace-src emitted,
    CPU seconds per stage)."""
    source = TraceSource(path=str(trace_file), batch_pages=config.batch_pages, preload=True)
    pipeline = Pipeline.chain(source, *RUNTIME_CHAINS[chain](cache, config), TimedNullSink())
    started = time.perf_counter()
    result = pipeline.run(mode=mode, timeout=600)
    wall = time.perf_counter() - started
    stats = {stage: values for (stage, _), values in result.statistics.items()}
    sink = stats["null-sink0"]["counters"]
    dirty = stats["trace-src0"]["pages_out"] * page_size   # fused or not, trace-src reports under its own name
    cpu = cpu_seconds_by_node(result.statistics)
    return sink["last_batch"] - sink["first_batch"], wall, dirty, cpu


def measure_runtime(trace_file: Path, chain: str, mode: str, cache: str, config_name: str, page_size: int,
                    repeats: int) -> RuntimeResult:
    runs = [run_runtime(trace_file, chain, mode, cache, CONFIGS[config_name], page_size) for _ in range(repeats)]
    window = statistics.median(run[0] for run in runs)
    wall = statistics.median(run[1] for run in runs)
    gigabytes = runs[0][2] / GB
    cpu_per_gb = {name: statistics.median(run[3][name] for run in runs) / gigabytes for name in runs[0][3]}
    return RuntimeResult(chain, config_name, mode, runs[0][2] / window / GB, window, wall, runs[0][2], cpu_per_gb)


def report_runtime(trace: RecordedTrace, modes: list[str], configs: list[str], args: argparse.Namespace,
                   figures: dict) -> bool:
    """Measure the real chain per configuration (and the baselines) in each mode, print them, check the targets.

    True if the best configuration misses a target.
    """
    page_size = trace.base.shape[1]
    with tempfile.TemporaryDirectory(prefix="pagepipe-bench-") as directory:
        trace_file = write_repeated_trace(trace, args.rounds, Path(directory))
        runs = [(chain, config) for config in configs for chain in RUNTIME_CHAINS
                if chain == SENDER_CHAIN or config == configs[0]]
        results = [measure_runtime(trace_file, chain, mode, args.cache, config, page_size, args.repeats)
                   for chain, config in runs for mode in modes]
    figures["runtime"] = [asdict(result) for result in results]
    print(f"\n{'trace-src ! ... ! null-sink':<28} {'configuration':<34} {'mode':<8} {'GB/s':>6} {'window s':>9} "
          f"{'wall s':>7}  ({results[0].dirty_bytes / 1e6:.0f} MB of dirty pages)")
    for result in results:
        print(f"{result.chain:<28} {result.config:<34} {result.mode:<8} {result.gbps:6.2f} "
              f"{result.window_seconds:9.2f} {result.wall_seconds:7.2f}")
    print("CPU seconds per GB of dirty pages, per stage (process mode; each stage's worker processes from its "
          "start, trace-src's preload included):")
    for result in results:
        if result.mode == "process":
            shares = ", ".join(f"{name} {value:.3f}" for name, value in result.cpu_per_gb.items())
            print(f"  {result.chain} ({result.config}): {shares}")
    hops = [result for result in results if result.chain == HOP_ONE and result.mode == "process"]
    if hops:
        met = hops[0].gbps >= HOP_TARGET_GBPS
        figures["one_hop"] = {"gbps": hops[0].gbps, "met": met}
        print(f"one hop (trace-src ! null-sink), process mode: {hops[0].gbps:.2f} GB/s "
              f"(target >= {HOP_TARGET_GBPS}): {'met' if met else 'MISSED'}")
    speeds: dict[str, dict[str, float]] = {}
    for result in results:
        if result.chain == SENDER_CHAIN:
            speeds.setdefault(result.config, {})[result.mode] = result.gbps
    best = max(speeds, key=lambda name: speeds[name].get("process", speeds[name].get("inline", 0.0)))
    figures["best_config"] = best
    figures["targets"] = {}
    shown = [("default", configs[0])] + ([("best", best)] if best != configs[0] else [])
    for label, name in shown:
        checks = check_runtime_targets(speeds[name])
        figures["targets"][label] = {"config": name, **{key: {"line": text, "met": met}
                                                        for key, (text, met) in checks.items()}}
        print(f"{label} configuration: {name}{' (also the best)' if name == best and label == 'default' else ''}")
        for text, met in checks.values():
            print(f"  {text}: {'met' if met else 'MISSED'}")
    return not all(met for _, met in check_runtime_targets(speeds[best]).values())


def check_runtime_targets(speed: dict[str, float]) -> dict[str, tuple[str, bool]]:
    """Target name -> (line with the figure, met) for one configuration's sender-chain GB/s per mode."""
    checks = {}
    if "process" in speed:
        checks["throughput"] = (f"sender chain, process mode: {speed['process']:.2f} GB/s "
                                f"(target >= {THROUGHPUT_TARGET_GBPS})", speed["process"] >= THROUGHPUT_TARGET_GBPS)
    if "process" in speed and "inline" in speed:
        share = speed["process"] / speed["inline"]
        checks["process_share_of_inline"] = (f"sender chain, process / inline throughput: {share:.2f} "
                                             f"(target >= {PROCESS_SHARE_TARGET})", share >= PROCESS_SHARE_TARGET)
    return checks


def report_direct(epochs: Sequence[Epoch], chains: list[str], args: argparse.Namespace, figures: dict) -> bool:
    """Measure each codec chain driven by hand, print speed and ratio, check the ratio target; True if missed."""
    results = {chain: measure_direct(chain, epochs, args.batch_pages, args.cache, args.repeats) for chain in chains}
    figures["direct"] = {chain: asdict(result) for chain, result in results.items()}
    print(f"\n{'direct chain':<14} {'GB/cpu-s':>8} {'ratio':>8}   without epoch 1: {'GB/cpu-s':>8} {'ratio':>7}")
    for result in results.values():
        print(f"{result.chain:<14} {result.gbps:8.2f} {result.ratio:8.2f}   {'':>16} "
              f"{result.gbps_after_first_epoch:8.2f} {result.ratio_after_first_epoch:7.2f}")
    if "native+zstd" not in results or "xbzrle" not in results:
        return False
    gain = results["native+zstd"].ratio / results["xbzrle"].ratio
    gain_later = results["native+zstd"].ratio_after_first_epoch / results["xbzrle"].ratio_after_first_epoch
    figures["ratio_gain"] = {"whole_trace": gain, "after_first_epoch": gain_later}
    print(f"\nnative+zstd ratio / xbzrle ratio: {gain:.2f} over the trace, {gain_later:.2f} without epoch 1 "
          f"(target >= {RATIO_TARGET}: {'met' if gain >= RATIO_TARGET else 'MISSED'})")
    return gain < RATIO_TARGET


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench sender", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=None, help="trace .npz (default: the memcached corpus)")
    parser.add_argument("--epochs", type=int, default=None, help="use only the first N recorded epochs")
    parser.add_argument("--batch-pages", type=int, default=256, help="pages per batch of the direct measurement (default 256)")
    parser.add_argument("--cache", default="128MiB", help="xor-delta cache size (default 128MiB: the whole corpus)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; medians reported")
    parser.add_argument("--chains", default=",".join(CHAINS), help="codec chains for the direct measurement")
    parser.add_argument("--rounds", type=int, default=4, help="times the recorded epochs repeat in the runtime trace")
    parser.add_argument("--modes", default="inline,process", help="runtime modes to measure ('' for none)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"runtime configurations to try, the first one reported as the default (known: {', '.join(CONFIGS)})")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown or not configs:
        print(f"sender benchmark: unknown configuration(s) {', '.join(unknown) or '(none given)'} "
              f"(known: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2

    path = args.trace or find_corpus()
    if path is None:
        print("sender benchmark: no trace given and the corpus is not available", file=sys.stderr)
        return 2
    try:
        trace = read_trace(path, max_epochs=args.epochs)
    except (CorruptData, TransportError) as exc:
        print(f"sender benchmark: {exc}", file=sys.stderr)
        return 2
    epochs = trace_epochs(trace)
    dirty = sum(epoch.data.nbytes for epoch in epochs)
    print(f"trace {path}: {len(epochs)} epochs, {dirty / 1e6:.0f} MB of dirty pages "
          f"({epochs[0].data.nbytes / 1e6:.0f} MB in the first, whole-memory epoch)")

    figures: dict = {"trace": str(path)}
    chains = [chain for chain in args.chains.split(",") if chain]
    failed = report_direct(epochs, chains, args, figures)
    modes = [mode for mode in args.modes.split(",") if mode]
    if modes:
        failed |= report_runtime(trace, modes, configs, args, figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
