"""``pagepipe replica verify|inspect DIR``: check a replica directory, or say what it holds; read-only."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from pipeline.errors import ReplicaError
from pipeline.subcommand import Subcommand
from stages.common.replica_store import JOURNAL, read_manifest, region_keys, replica_layout, verify_replica


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pagepipe replica verify DIR`` and ``pagepipe replica inspect DIR``."""
    actions = parser.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check a replica directory, read-only")
    verify.add_argument("path", help="the replica directory")
    inspect = actions.add_parser("inspect", help="regions (names, dtypes, shapes), epoch and age of a replica")
    inspect.add_argument("path", help="the replica directory")


def run(args: argparse.Namespace, console: Console) -> int:
    if args.action == "inspect":
        try:
            lines = describe_replica(args.path)
        except ReplicaError as exc:
            lines = [str(exc)]
            code = 1
        else:
            code = 0
        for line in lines:
            console.print(line, markup=False, highlight=False)
        return code
    return _verify(args, console)


def describe_replica(path: str, now: float | None = None) -> list[str]:
    """The lines ``replica inspect`` prints: epoch, age, then one line per region. ReplicaError if unreadable."""
    manifest = read_manifest(path)
    layout = replica_layout(manifest["page_size"], manifest["regions"], max_pages=1 << 62)
    committed = manifest.get("committed_at")
    age = f"{(now or time.time()) - committed:.1f} s ago" if isinstance(committed, (int, float)) else "at an unknown time"
    lines = [f"replica {path}: epoch {manifest['epoch']}, committed {age}, {len(layout.regions)} regions, "
             f"{layout.page_count} pages of {layout.page_size} bytes"]
    journal = Path(path) / JOURNAL
    if journal.exists() and journal.stat().st_size:
        lines.append("  a commit is in progress or was interrupted (a journal is pending)")
    for key, region in zip(region_keys(layout.regions), layout.regions):
        kind = (f"{region.dtype} {region.shape}" if region.dtype else f"bytes ({region.npages * layout.page_size})")
        lines.append(f"  {key}: {kind}, pages {region.first_page}..{region.end_page - 1}, at {region.start:#x}")
    return lines


def _verify(args: argparse.Namespace, console: Console) -> int:
    """Print what ``verify`` found; 0 if the replica is consistent, 1 if not."""
    report = verify_replica(args.path)
    if not report.ok and report.epoch == 0 and not report.bad_pages:   # no replica to speak of
        raise ReplicaError(report.problems[0])
    if report.ok:
        console.print(f"replica {report.path}: epoch {report.epoch}, {report.pages} pages, consistent",
                      markup=False, highlight=False)
        return 0
    for problem in report.problems:
        console.print(f"replica {report.path}: {problem}" if not problem.startswith("replica ") else problem,
                      markup=False, highlight=False)
    if report.bad_pages:
        console.print(f"  damaged pages: {', '.join(map(str, report.bad_pages))}", markup=False, highlight=False)
        console.print(f"  the replica holds only epoch {report.epoch}, and these pages no longer match it (disk "
                      "damage, or a change made outside pagepipe). To repair it: restart the receiver's "
                      "replica-sink on this directory with an ack channel to the sender; it finds the damage, "
                      "starts empty and asks for a resync, and the sender's next checkpoint rewrites every page. "
                      "Without a running sender, no intact copy is left: replicate afresh.",
                      markup=False, highlight=False, soft_wrap=True)
    return 1


COMMAND = Subcommand("check or describe a replica directory: replica verify|inspect DIR", add_arguments, run)
