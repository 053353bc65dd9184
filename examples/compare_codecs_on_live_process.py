"""Record a trace of a live process, then compare codec chains on it.

1. Start a child Python interpreter that churns a dict (inserts and replaces values).
2. Record its memory, raw pages only, stopping it for each checkpoint:

       process-src pid=N interval=25ms checkpoints=K stop-at-end=true ! frame ! file-sink path=raw.trace

3. Stop the child, then replay the same trace through each codec chain:

       trace-src path=raw.trace ! classify ! xor-delta ! <chain> ! frame ! file-sink path=<chain>.trace

4. Check every chain loses nothing: each output, decoded into a replica
   (``file-src ! deframe ! decode ! replica-sink``), must give the same memory
   digest as the raw trace. The exit status is 0 only if all digests match.

    python examples/compare_codecs_on_live_process.py --checkpoints 20 \\
        --chain "rle format=xbzrle" --chain "rle format=native ! zstd"
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.errors import PagepipeError
from pipeline.pipeline import Pipeline
from stages.common.replica_store import load_replica

DEFAULT_CHAINS = ("rle format=xbzrle", "rle format=native ! zstd")

CHILD_PROGRAM = """
import random, time
table, rng = {}, random.Random(1)
print("ready", flush=True)
while True:
    for _ in range(2000):
        table[rng.randrange(100_000)] = rng.randbytes(rng.randrange(16, 256))
    time.sleep(0.002)
"""


def record_child(trace: Path, checkpoints: int, interval: str) -> int:
    """Record ``checkpoints`` checkpoints of a dict-churning child into ``trace``; returns the pages recorded."""
    child = subprocess.Popen([sys.executable, "-c", CHILD_PROGRAM], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()   # "ready": the interpreter is up and churning
        recorded = Pipeline.parse(f"process-src pid={child.pid} interval={interval} checkpoints={checkpoints} "
                                  f"stop-at-end=true ! frame ! file-sink path={trace}").run(mode="inline", timeout=120)
    finally:
        child.kill()
        child.wait()
    return recorded.totals("frame0").get("pages_in", 0)


def encoder(trace: Path, chain: str, out: Path) -> Pipeline:
    """``trace`` replayed through ``classify ! xor-delta ! chain ! frame`` into ``out`` (ParseError for a bad chain)."""
    return Pipeline.parse(f"trace-src path={trace} ! classify ! xor-delta ! {chain} ! frame ! file-sink path={out}")


def replica_digest(stream: Path, replica: Path) -> str:
    """SHA-256 (first 16 hex digits) of the memory a stream file leaves in a fresh replica, regions in name order."""
    Pipeline.parse(f"file-src path={stream} ! deframe ! decode ! replica-sink path={replica} fsync=false").run(
        mode="inline", timeout=120)
    digest = hashlib.sha256()
    for name, memory in sorted(load_replica(replica).items()):
        digest.update(name.encode())
        digest.update(memory)
    return digest.hexdigest()[:16]


def compare(chains: list[str], checkpoints: int, interval: str, scratch: Path) -> int:
    """Record the child, replay it through every chain, print the table; 0 if every chain decodes losslessly."""
    raw = scratch / "raw.trace"
    outputs = [scratch / f"chain{index}.trace" for index in range(len(chains))]
    encoders = [encoder(raw, chain, out) for chain, out in zip(chains, outputs)]   # bad chains fail here, early
    pages = record_child(raw, checkpoints, interval)
    dirty_bytes = pages * os.sysconf("SC_PAGE_SIZE")
    expected = replica_digest(raw, scratch / "replica-raw")
    table = Table(title=f"{checkpoints} checkpoints of a live process, {dirty_bytes / 1e6:.1f} MB of dirty pages "
                        f"(raw trace digest {expected})")
    for column in ("chain", "wire bytes", "ratio", "replay MB/s", "replica digest"):
        table.add_column(column, justify="left" if column in ("chain", "replica digest") else "right")
    all_match = True
    for index, (chain, out, encoding) in enumerate(zip(chains, outputs, encoders)):
        began = time.perf_counter()
        encoding.run(mode="inline", timeout=120)
        seconds = time.perf_counter() - began
        wire_bytes = out.stat().st_size
        digest = replica_digest(out, scratch / f"replica{index}")
        all_match &= digest == expected
        table.add_row(chain, f"{wire_bytes:,}", f"{dirty_bytes / wire_bytes:.1f}",
                      f"{dirty_bytes / seconds / 1e6:.0f}", digest if digest == expected else f"{digest} DIFFERENT")
    Console(width=120).print(table)
    print(f"replayed pages match the recording: {'yes' if all_match else 'NO'}")
    return 0 if all_match else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints of the child to record (default 20)")
    parser.add_argument("--interval", default="25ms", help="time between checkpoints (default 25ms)")
    parser.add_argument("--chain", action="append", dest="chains", metavar="STAGES",
                        help="codec chain between xor-delta and frame, repeatable "
                             f"(default: {' and '.join(map(repr, DEFAULT_CHAINS))})")
    parser.add_argument("--keep", default=None, help="keep the traces and replicas in this directory")
    args = parser.parse_args(argv)
    if args.checkpoints < 1:
        parser.error("--checkpoints must be at least 1")
    chains = args.chains or list(DEFAULT_CHAINS)
    try:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            return compare(chains, args.checkpoints, args.interval, Path(args.keep))
        with tempfile.TemporaryDirectory(prefix="compare-codecs-") as scratch:
            return compare(chains, args.checkpoints, args.interval, Path(scratch))
    except PagepipeError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
