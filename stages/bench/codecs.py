"""Codec benchmark: compression ratio and encode/decode speed, each beside a plain memory copy.

``pagepipe bench codecs`` or ``python -m benchmarks.codecs``. For every data set
(synthetic patterns, the recorded corpus, captures) and every codec it reports
the ratio (page bytes / encoded payload bytes) and encode and decode
throughput in GB/s of page bytes, and, measured in the same run on the same
bytes, ``np.copyto`` of those pages, so each speed is also a fraction of
memcpy. Then it checks the targets of issue 2 on real memory.

Measuring honestly: every repeat encodes from the *old* cached copies (they
are restored outside the timed region), decodes onto the old replica, and
checks both results; figures are medians over repeats, single thread, pages
fed in batches like the pipeline's.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from stages.bench.realmemory import REPO_ROOT, PagePairs, find_corpus, load_trace_pairs
from pipeline.batch import DEFAULT_PAGE_SIZE
from pipeline.errors import ConfigError, PagepipeError
from stages.codecs import EntropyCodec, Encoded, get_chain_codec, get_codec, list_codecs

CAPTURES_ENV = "PAGEPIPE_CAPTURES"
GB = 1e9


class Codec(Protocol):
    """What the benchmark needs of a codec (``stages.codecs.get_codec`` returns one)."""

    def encode(self, current: np.ndarray, cached: np.ndarray) -> Encoded: ...

    def decode(self, encoded: Encoded, replica: np.ndarray) -> None: ...


# ---- data sets -------------------------------------------------------------

def _filled_pages(rng: np.random.Generator, npages: int, page_size: int) -> np.ndarray:
    """Pages that look like heap: half zero words, the rest small integers and pointers."""
    words = page_size // 8
    pages = np.zeros((npages, words), dtype=np.uint64)
    used = rng.random((npages, words)) < 0.5
    small = rng.integers(0, 256, size=(npages, words), dtype=np.uint64)
    pointers = np.uint64(0x7F0000000000) + (rng.integers(0, 1 << 24, size=(npages, words), dtype=np.uint64) << np.uint64(3))
    pages[used] = np.where(rng.random((npages, words)) < 0.5, small, pointers)[used]
    return pages.view(np.uint8).reshape(npages, page_size)


def _sparse_writes(rng: np.random.Generator, npages: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A few scattered 8-byte stores per page: the common case of a dirty page."""
    cached = _filled_pages(rng, npages, page_size)
    current = cached.copy()
    words = current.view(np.uint64)
    for row in range(npages):
        spots = rng.integers(0, page_size // 8, size=int(rng.integers(1, 16)))
        words[row, spots] = rng.integers(0, 1 << 63, size=spots.size, dtype=np.uint64)
    return cached, current


def _counters(rng: np.random.Generator, npages: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of 64-bit counters, a tenth of them incremented."""
    cached = rng.integers(0, 1 << 20, size=(npages, page_size // 8), dtype=np.uint64)
    current = cached + (rng.random(cached.shape) < 0.1).astype(np.uint64)
    return cached.view(np.uint8), current.view(np.uint8)


def _fresh_allocations(rng: np.random.Generator, npages: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero pages receiving their first data: a quarter of each page written."""
    cached = np.zeros((npages, page_size), dtype=np.uint8)
    current = cached.copy()
    current[:, : page_size // 4] = _filled_pages(rng, npages, page_size)[:, : page_size // 4]
    return cached, current


def _rewritten(rng: np.random.Generator, npages: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pages overwritten with random bytes: nothing to compress, the worst case."""
    shape = (npages, page_size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), rng.integers(0, 256, size=shape, dtype=np.uint8)


SYNTHETIC_PATTERNS: dict[str, Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]] = {
    "sparse-writes": _sparse_writes,
    "counters": _counters,
    "fresh-allocations": _fresh_allocations,
    "rewritten": _rewritten,
}


def _synthetic_loader(pattern: str, npages: int) -> Callable[[int | None], PagePairs]:
    """A DataSource loader of one synthetic pattern (the page cap does not apply)."""
    return lambda _cap: synthetic_pairs(pattern, npages)


def synthetic_pairs(pattern: str, npages: int, *, page_size: int = DEFAULT_PAGE_SIZE, seed: int = 0) -> PagePairs:
    """Page pairs of one synthetic pattern (names in SYNTHETIC_PATTERNS), reproducible from ``seed``."""
    cached, current = SYNTHETIC_PATTERNS[pattern](np.random.default_rng(seed), npages, page_size)
    return PagePairs(f"synthetic:{pattern}", np.ascontiguousarray(cached), np.ascontiguousarray(current))


def captures_folder() -> Path:
    """Where large captures live (not in the repo): ``$PAGEPIPE_CAPTURES``, else ``../captures``."""
    return Path(os.environ.get(CAPTURES_ENV) or REPO_ROOT.parent / "captures")


@dataclass(frozen=True)
class DataSource:
    """A data set to load on demand: ``real`` ones count for the targets."""

    name: str
    real: bool
    load: Callable[[int | None], PagePairs]


def resolve_data(specs: Sequence[str], *, synthetic_pages: int) -> list[DataSource]:
    """Data sources for ``--data`` values: synthetic, corpus, capture:PATH, all (default: synthetic + corpus if present).

    Raises ConfigError for a spec it cannot satisfy.
    """
    sources: list[DataSource] = []
    corpus = find_corpus()
    for spec in specs or ["default"]:
        if spec in ("synthetic", "default", "all"):
            sources += [DataSource(f"synthetic:{pattern}", False, _synthetic_loader(pattern, synthetic_pages))
                        for pattern in SYNTHETIC_PATTERNS]
        if spec in ("corpus", "default", "all"):
            if corpus is None and spec == "corpus":
                raise ConfigError("--data corpus: no corpus found; set PAGEPIPE_CORPUS to memcached-trace.npz")
            if corpus is not None:
                sources.append(_trace_source(corpus))
        if spec == "all":
            sources += [_trace_source(path) for path in sorted(captures_folder().glob("*.npz"))]
        elif spec.startswith("capture:"):
            path = Path(spec.partition(":")[2])
            if not path.is_file():
                raise ConfigError(f"--data {spec}: no such file {path}")
            sources.append(_trace_source(path))
        elif spec not in ("synthetic", "corpus", "default"):
            raise ConfigError(f"--data {spec!r}: expected synthetic, corpus, capture:PATH or all")
    return sources


def _trace_source(path: Path) -> DataSource:
    return DataSource(path.stem, True, lambda cap: load_trace_pairs(path, max_pages=cap))


def select_codecs(names: Sequence[str]) -> dict[str, Codec]:
    """Codecs by name; by default every registered page codec and chain (entropy coders alone encode no pages)."""
    if names:
        return {name: get_chain_codec(name) for name in names}
    return {name: get_chain_codec(name) for name in list_codecs() if not isinstance(get_codec(name), EntropyCodec)}


# ---- measuring -------------------------------------------------------------

@dataclass
class CodecResult:
    """One codec on one data set. Speeds are GB/s of page bytes; ``*_x_memcpy`` fractions of memcpy."""

    codec: str
    ratio: float = 0.0
    encode_gbps: float = 0.0
    decode_gbps: float = 0.0
    encode_x_memcpy: float = 0.0
    decode_x_memcpy: float = 0.0
    error: str = ""


@dataclass
class DatasetResult:
    name: str
    real: bool
    npages: int
    page_bytes: int
    memcpy_gbps: float
    codecs: list[CodecResult] = field(default_factory=list)

    def result(self, codec: str) -> CodecResult | None:
        return next((r for r in self.codecs if r.codec == codec and not r.error), None)


def batch_slices(npages: int, batch_pages: int) -> list[slice]:
    """Consecutive slices of ``batch_pages`` pages covering ``npages``."""
    return [slice(start, min(start + batch_pages, npages)) for start in range(0, npages, batch_pages)]


def _timed(work: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds ``work(*args)`` took, with the garbage collector held off, and its result."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        result = work(*args)
        return (time.perf_counter_ns() - start) / 1e9, result
    finally:
        gc.enable()


def _copy_all(batches: list[np.ndarray], target: np.ndarray, slices: list[slice]) -> None:
    for s, pages in zip(slices, batches):
        np.copyto(target[s], pages)


def _encode_all(codec: Codec, batches: list[np.ndarray], cache: np.ndarray, slices: list[slice]) -> list[Encoded]:
    return [codec.encode(pages, cache[s]) for s, pages in zip(slices, batches)]


def _decode_all(codec: Codec, encoded: list[Encoded], replica: np.ndarray, slices: list[slice]) -> None:
    for s, batch in zip(slices, encoded):
        codec.decode(batch, replica[s])


def measure(pairs: PagePairs, codecs: Mapping[str, Codec], *, repeat: int, batch_pages: int, real: bool = False,
            advance: Callable[[], None] = lambda: None) -> DatasetResult:
    """Ratio and medians of encode, decode and memcpy time for every codec on ``pairs``.

    Repeats are interleaved (memcpy, then each codec) so drift on a shared
    machine hits all alike. Every buffer is touched before it is timed, so
    no figure pays for page faults. A codec that raises, or whose encode
    does not leave the cache equal to the current pages, or whose decode
    does not rebuild them, gets ``error`` set instead of figures.
    """
    slices = batch_slices(pairs.npages, batch_pages)
    batches = [pairs.current[s] for s in slices]
    work = pairs.cached.copy()           # the cache for encode, the replica for decode
    copy_target = pairs.current.copy()
    memcpy_times: list[float] = []
    encode_times: dict[str, list[float]] = {name: [] for name in codecs}
    decode_times: dict[str, list[float]] = {name: [] for name in codecs}
    results = {name: CodecResult(name) for name in codecs}
    for attempt in range(repeat):
        memcpy_times.append(_timed(_copy_all, batches, copy_target, slices)[0])
        for name, codec in codecs.items():
            if results[name].error:
                continue
            try:
                np.copyto(work, pairs.cached)
                seconds, encoded = _timed(_encode_all, codec, batches, work, slices)
                encode_times[name].append(seconds)
                if attempt == 0:
                    _check(np.array_equal(work, pairs.current), "encode left the cache different from the current pages")
                    results[name].ratio = pairs.nbytes / max(1, sum(int(e.payload.nbytes) for e in encoded))
                np.copyto(work, pairs.cached)
                decode_times[name].append(_timed(_decode_all, codec, encoded, work, slices)[0])
                if attempt == 0:
                    _check(np.array_equal(work, pairs.current), "decode did not rebuild the current pages")
            except Exception as exc:  # a broken codec is reported in its row, the others still run
                results[name].error = f"{type(exc).__name__}: {exc}"
            advance()

    memcpy_gbps = _gbps(pairs.nbytes, memcpy_times)
    for name, result in results.items():
        if not result.error:
            result.encode_gbps = _gbps(pairs.nbytes, encode_times[name])
            result.decode_gbps = _gbps(pairs.nbytes, decode_times[name])
            result.encode_x_memcpy = result.encode_gbps / memcpy_gbps
            result.decode_x_memcpy = result.decode_gbps / memcpy_gbps
    return DatasetResult(pairs.name, real, pairs.npages, pairs.nbytes, memcpy_gbps, list(results.values()))


class _WrongPages(Exception):
    """A codec produced wrong pages (reported in its row, never raised out of measure())."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _WrongPages(message)


def _gbps(nbytes: int, seconds: Sequence[float]) -> float:
    return nbytes / GB / max(statistics.median(seconds), 1e-9)


# ---- targets ---------------------------------------------------------------

@dataclass
class TargetCheck:
    dataset: str
    target: str
    figure: float | None
    threshold: float
    met: bool | None  # None: not measured (a codec missing or failed)


def check_targets(datasets: Iterable[DatasetResult]) -> list[TargetCheck]:
    """The issue's targets on every real-memory data set."""
    checks: list[TargetCheck] = []
    for data in datasets:
        if not data.real:
            continue
        native, xbzrle, zstd = data.result("native"), data.result("xbzrle"), data.result("native+zstd")

        def add(target: str, threshold: float, value: float | None) -> None:
            checks.append(TargetCheck(data.name, target, value, threshold, None if value is None else value >= threshold))

        add("native encode >= 0.55 x memcpy", 0.55, native.encode_x_memcpy if native else None)
        add("native encode >= 1.0 x xbzrle encode", 1.0,
            native.encode_gbps / xbzrle.encode_gbps if native and xbzrle else None)
        add("native decode >= 0.7 x memcpy", 0.7, native.decode_x_memcpy if native else None)
        add("native ratio >= 1.0 x xbzrle ratio", 1.0, native.ratio / xbzrle.ratio if native and xbzrle else None)
        add("native+zstd ratio >= 1.35 x xbzrle ratio", 1.35, zstd.ratio / xbzrle.ratio if zstd and xbzrle else None)
    return checks


# ---- report ----------------------------------------------------------------

def render(console: Console, data: DatasetResult) -> None:
    table = Table(title=f"{data.name}: {data.npages} pages, {data.page_bytes / 2**20:.1f} MiB, "
                        f"memcpy {data.memcpy_gbps:.2f} GB/s", title_justify="left")
    for column in ("codec", "ratio", "encode GB/s", "encode x memcpy", "decode GB/s", "decode x memcpy"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for r in data.codecs:
        if r.error:
            table.add_row(r.codec, "[red]failed[/red]", "-", "-", "-", "-")
        else:
            table.add_row(r.codec, f"{r.ratio:.2f}", f"{r.encode_gbps:.2f}", f"{r.encode_x_memcpy:.2f}",
                          f"{r.decode_gbps:.2f}", f"{r.decode_x_memcpy:.2f}")
    console.print(table)
    for r in data.codecs:
        if r.error:
            console.print(f"[red]{r.codec} failed on {data.name}:[/red] {r.error}", highlight=False)


def render_targets(console: Console, checks: Sequence[TargetCheck]) -> None:
    if not checks:
        console.print("targets: no real-memory data set measured (use --data corpus or capture:PATH)")
    for c in checks:
        verdict = ("[yellow]not measured[/yellow]" if c.met is None
                   else "[green]met[/green]" if c.met else "[red]MISSED[/red]")
        figure = "-" if c.figure is None else f"{c.figure:.3f}"
        console.print(f"target {c.dataset}: {c.target}: {figure} {verdict}")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


# ---- command line ----------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagepipe bench codecs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", default=[],
                        help="synthetic | corpus | capture:PATH | all (repeatable; default: synthetic + corpus if present)")
    parser.add_argument("--codecs", default="", help="comma-separated codec names (default: every registered page codec and chain)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats; figures are medians (default 5)")
    parser.add_argument("--pages", type=int, default=16384,
                        help="at most this many page pairs per data set (synthetic: 2048 or this, if fewer)")
    parser.add_argument("--batch-pages", type=int, default=256, help="pages per encode call, like a pipeline batch")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 if a codec failed or gave wrong pages, 2 on bad arguments."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 110)  # keep table headers on one line in logs
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.repeat < 1 or args.pages < 1 or args.batch_pages < 1:
            raise ValueError("--repeat, --pages and --batch-pages must be at least 1")
        sources = resolve_data(args.data, synthetic_pages=min(2048, args.pages))
        codecs = select_codecs([n.strip() for n in args.codecs.split(",") if n.strip()])
    except (PagepipeError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2

    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    console.print(f"codec benchmark: {machine['cpu']} ({machine['cores']} cores), Python {machine['python']}, "
                  f"numpy {machine['numpy']}; {args.repeat} repeats (medians), batches of {args.batch_pages} pages, "
                  "one thread", highlight=False)
    datasets: list[DatasetResult] = []
    with Progress(console=console, transient=True) as progress:
        for source in sources:
            task = progress.add_task(f"{source.name}: loading", total=args.repeat * len(codecs))
            try:
                pairs = source.load(args.pages)
            except PagepipeError as exc:
                console.print(f"[red]error:[/red] {exc}")
                return 2
            if pairs.npages == 0:
                console.print(f"{source.name}: no page pairs, skipped")
                progress.remove_task(task)
                continue
            progress.update(task, description=source.name)
            result = measure(pairs, codecs, repeat=args.repeat, batch_pages=args.batch_pages, real=source.real,
                             advance=lambda: progress.advance(task))
            datasets.append(result)
            progress.remove_task(task)
            render(console, result)
    checks = check_targets(datasets)
    render_targets(console, checks)
    if args.json:
        figures = {"machine": machine, "repeat": args.repeat, "batch_pages": args.batch_pages,
                   "datasets": [asdict(d) for d in datasets], "targets": [asdict(c) for c in checks]}
        try:
            args.json.write_text(json.dumps(figures, indent=2))
        except OSError as exc:
            console.print(f"[red]error:[/red] cannot write {args.json} ({exc})")
            return 2
    return 1 if any(r.error for d in datasets for r in d.codecs) else 0


if __name__ == "__main__":
    sys.exit(main())
