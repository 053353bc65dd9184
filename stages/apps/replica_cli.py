"""``pagepipe replica verify DIR``: check a replica directory, read-only."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.errors import ReplicaError
from pipeline.subcommand import Subcommand
from stages.common.replica_store import verify_replica


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pagepipe replica verify DIR``."""
    actions = parser.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check a replica directory, read-only")
    verify.add_argument("path", help="the replica directory")


def run(args: argparse.Namespace, console: Console) -> int:
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


COMMAND = Subcommand("check a replica directory: replica verify DIR", add_arguments, run)
