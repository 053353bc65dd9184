"""``pagepipe bench NAME [args]``: run the benchmark module ``stages.bench.NAME``."""
from __future__ import annotations

import argparse
import importlib

from rich.console import Console

from pipeline.subcommand import Subcommand
from pipeline.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a benchmark module of stages/bench/ (codecs, runtime, sender, ...)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="passed to the benchmark's main()")


def run(args: argparse.Namespace, console: Console) -> int:
    if not args.name.isidentifier():
        raise ConfigError(f"bench: {args.name!r} is not a benchmark name")
    module_name = f"{__package__}.{args.name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(f"bench: no benchmark named {args.name!r} (stages/bench/{args.name}.py)") from None
    if not hasattr(module, "main"):
        raise ConfigError(f"bench: {args.name!r} is a helper module, not a benchmark")
    return int(module.main(list(args.arguments)) or 0)


COMMAND = Subcommand("run a benchmark from stages/bench/", add_arguments, run)
