"""Resume benchmark: a replica back as verified, tracked arrays, against reading its files with ``np.fromfile``.

``pagepipe bench resume [--size 1GiB] [--repeat 3]`` writes a replica of one
float64 region of ``--size`` (untimed), warms the page cache, then times, as
medians of ``--repeat`` runs, each in a fresh Python process (a program resumes
once, into memory it never touched; in a long-lived process ``np.fromfile``
would often reuse memory an earlier run already faulted in, which resuming
into new page-aligned mappings never can):

- **fromfile**: ``np.fromfile`` of the replica's page image (the baseline: the
  bytes, unverified, in an ordinary array);
- **resume**: ``resume_from_replica`` (every page read into a page-aligned
  mapping and checked against its digest, the digests against the manifest)
  plus registering the arrays for userfaultfd write tracking, as ``region-src``
  does when it starts (its staging buffer, a pipeline resource allocated
  whatever the arrays, is left out).

Targets: resume <= 2 s for 1 GiB, and <= 1.5 x fromfile.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.units import parse_size
from stages.common.pages import combine_digests, digest_pages
from stages.common.layout import Layout
from stages.common.replica_store import IMAGE, ReplicaStore, whole_pages
from stages.trackers.region import PAGE_SIZE
from stages.trackers.resume import resume_from_replica
from stages.trackers.uffd import WriteTracker

TARGET_SECONDS_PER_GIB = 2.0
TARGET_RATIO = 1.5
_PIECE_PAGES = 16384   # written a piece at a time: the benchmark needs no second copy of the region


def write_replica(path: Path, nbytes: int) -> None:
    """A replica of one float64 region of ``nbytes`` (whole pages), non-zero throughout."""
    npages = nbytes // PAGE_SIZE
    count = npages * PAGE_SIZE // 8
    region = {"name": "state", "start": 0x7F0000000000, "first_page": 0, "npages": npages,
              "dtype": "<f8", "shape": [count]}
    layout = Layout.from_untrusted(PAGE_SIZE, [region], max_pages=npages)
    store = ReplicaStore(path, fsync=False)
    try:
        for epoch, low in enumerate(range(0, npages, _PIECE_PAGES), start=1):
            numbers = np.arange(low, min(npages, low + _PIECE_PAGES), dtype=np.uint64)
            values = np.arange(numbers[0] * (PAGE_SIZE // 8), (numbers[-1] + 1) * (PAGE_SIZE // 8), dtype=np.float64)
            pages = (values * 1.000001).view(np.uint8).reshape(-1, PAGE_SIZE)
            digests = digest_pages(pages)
            store.commit(epoch, layout, numbers, [whole_pages(pages)], digests, combine_digests(numbers, digests))
    finally:
        store.close()


def in_fresh_process(function: str, path: Path) -> float:
    """Seconds ``function(path)`` of this module takes, run in a new Python process."""
    code = f"from pathlib import Path; from {__name__} import {function}; print({function}(Path({str(path)!r})))"
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1])


def time_fromfile(path: Path) -> float:
    began = time.perf_counter()
    data = np.fromfile(path / IMAGE, dtype=np.uint8)
    seconds = time.perf_counter() - began
    del data
    return seconds


def time_resume(path: Path) -> float:
    began = time.perf_counter()
    arrays = resume_from_replica(path)
    tracker = WriteTracker()
    for array in arrays.values():
        tracker.register(array.ctypes.data, array.nbytes)   # write-protected: tracked from here on
    seconds = time.perf_counter() - began
    tracker.close()
    del arrays
    gc.collect()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagepipe bench resume", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="replica size (default 1GiB, the target's)")
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs (default 3)")
    parser.add_argument("--directory", default=None, help="where to write the replica (default: a temporary one)")
    try:
        args = parser.parse_args(argv)
        nbytes = parse_size(args.size) // PAGE_SIZE * PAGE_SIZE
    except (SystemExit, ConfigError, ValueError):
        return 2
    if nbytes <= 0 or args.repeat < 1:
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-resume-", dir=args.directory) as scratch:
        path = Path(scratch)
        print(f"resume: writing a replica of {nbytes / 2**20:.0f} MiB...", flush=True)
        write_replica(path, nbytes)
        time_fromfile(path)                           # page cache warm for both
        fromfile = statistics.median(in_fresh_process("time_fromfile", path) for _ in range(args.repeat))
        resume = statistics.median(in_fresh_process("time_resume", path) for _ in range(args.repeat))
    limit = TARGET_SECONDS_PER_GIB * nbytes / 2**30
    ratio = resume / fromfile
    time_verdict = "met" if resume <= limit else "MISSED"
    ratio_verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"  np.fromfile of the image (fresh process): {fromfile:.3f} s ({nbytes / fromfile / 1e9:.2f} GB/s)")
    print(f"  resume, verified and tracked (fresh process): {resume:.3f} s ({nbytes / resume / 1e9:.2f} GB/s); "
          f"target <= {limit:.2f} s: {time_verdict}")
    print(f"  resume / fromfile: {ratio:.2f} x; target <= {TARGET_RATIO} x: {ratio_verdict}")
    return 0 if time_verdict == ratio_verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main())
