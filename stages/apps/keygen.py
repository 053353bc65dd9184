"""``pagepipe keygen DIR [--name NAME]``: a CurveZMQ key pair for a tcp link (docs/SECURITY.md)."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.subcommand import Subcommand
from stages.common.security import write_keypair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="where to write NAME.key (public) and NAME.key_secret (mode 0600)")
    parser.add_argument("--name", default="pagepipe", help="file name stem (default: pagepipe)")


def run(args: argparse.Namespace, console: Console) -> int:
    """Write the pair and say what goes where."""
    public, secret = write_keypair(args.directory, args.name)
    console.print(f"public key: {public}  (give it to the other end: server-key= or its authorized-keys= directory)\n"
                  f"secret key: {secret}  (this end's secret-key=; keep it private)", markup=False, highlight=False)
    return 0


COMMAND = Subcommand("write a CurveZMQ key pair for tcp links: keygen DIR [--name NAME]", add_arguments, run)
