"""The ``pagepipe`` command: inspect, launch, stage, and the subcommands other packages add.

Each subcommand is a ``Subcommand`` (a summary, a function adding its arguments, a function
running it). The runtime's own are listed in ``BUILTIN_SUBCOMMANDS``; the others (``demo``,
``replica``, ``bench``) are found through the ``pagepipe.commands`` entry-point group, the way
stages are, so the runtime imports no stage or application.
Exit codes: 0 success, 1 a stage failed, 2 a configuration or usage error,
130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from importlib.metadata import entry_points
from typing import Sequence

from rich.console import Console

from .bus import Message
from .errors import ConfigError, StageFailed
from .launch import ElementWords, build_stage, parse_description
from .pipeline import DEFAULT_MAX_INFLIGHT, MODES, Pipeline
from .progress import Progress, print_summary
from .registry import factories, import_target, load
from .routing import PAGE_FORMATS
from .subcommand import Subcommand
from .units import parse_size
from .worker import InputSpec, OutputSpec, Worker, WorkerSpec

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


# ---- inspect ---------------------------------------------------------------
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a stage factory name; without it, list every stage")


def run_inspect(args: argparse.Namespace, console: Console) -> int:
    if args.name is None:
        for name, target in factories().items():
            try:
                description = import_target(target).description
            except ConfigError as exc:
                description = f"(unavailable: {exc})"
            console.print(f"{name:<16} {description}", highlight=False, soft_wrap=True)
        return 0
    stage_class = load(args.name)
    lines = [
        ("Factory name", stage_class.factory_name),
        ("Description", stage_class.description),
        ("Class", f"{stage_class.__module__}:{stage_class.__qualname__}"),
        ("Input formats", ", ".join(stage_class.input_caps) or "none (source)"),
        ("Output format", stage_class.output_caps or "none (sink)"),
        ("Shard key", stage_class.shard_key or "none (round-robin)"),
        ("Runs in caller", "yes" if stage_class.runs_in_caller else "no"),
    ]
    for label, value in lines:
        console.print(f"{label:<16}{value}", highlight=False)
    console.print("Properties:", highlight=False)
    for prop in stage_class.properties().values():
        if prop.internal:  # set by the runtime or by fusion, never by a user
            continue
        console.print(f"  {prop.name:<18}{prop.type:<10}default {prop.default!r}", highlight=False)
        if prop.describe_range():
            console.print(f"  {'':<18}{'':<10}range   {prop.describe_range()}", highlight=False)
        console.print(f"  {'':<18}{'':<10}{prop.doc}", highlight=False)
    return 0


# ---- launch ----------------------------------------------------------------
def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("description", nargs="+", help='the pipeline, e.g. "test-src ! identity ! null-sink"')
    parser.add_argument("--mode", choices=MODES, default="process")
    parser.add_argument("--stats-json", type=Path, help="write the final statistics as JSON to this file")
    parser.add_argument("--no-fuse", action="store_true", help="do not fuse neighbouring stages")
    parser.add_argument("--max-inflight", default=str(DEFAULT_MAX_INFLIGHT), help="bytes in flight per link (32MiB)")
    parser.add_argument("--timeout", type=float, help="stop and fail after this many seconds")


def run_launch(args: argparse.Namespace, console: Console) -> int:
    pipeline = Pipeline.parse(" ".join(args.description))
    with Progress(console) as progress:
        result = pipeline.run(mode=args.mode, on_message=progress, timeout=args.timeout,
                              fuse=not args.no_fuse, max_inflight=args.max_inflight)
    print_summary(console, result)
    if args.stats_json:
        args.stats_json.write_text(json.dumps(result.to_json(), indent=2))
    return 0


# ---- stage -----------------------------------------------------------------
def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("element", nargs="+", help="NAME [prop=value ...]")
    parser.add_argument("--input", help="endpoint to receive batches on (binds; '>tcp://host:port' connects)")
    parser.add_argument("--output", help="endpoint to send batches to (connects; '@tcp://*:port' binds)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (for sharded stages)")
    parser.add_argument("--workers", type=int, default=1, help="how many workers of this stage run")
    parser.add_argument("--max-inflight", default=str(DEFAULT_MAX_INFLIGHT), help="bytes queued per link (32MiB)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a tcp --input/--output: these runtime links are neither authenticated nor "
                             "encrypted (between hosts, link stages with zmq-sink/zmq-src and keys)")


def _check_runtime_links(args: argparse.Namespace) -> None:
    """A runtime link over tcp carries batches to anyone who connects: only with --insecure, in so many words."""
    for option, endpoint in (("--input", args.input), ("--output", args.output)):
        if endpoint and not endpoint.lstrip("@>").startswith(("ipc://", "inproc://")) and not args.insecure:
            raise ConfigError(f"stage: {option} {endpoint} is a network link without authentication or "
                              f"encryption: use ipc://, or zmq-sink/zmq-src with keys between hosts "
                              f"(docs/SECURITY.md), or pass --insecure to accept that")


def run_stage(args: argparse.Namespace, console: Console) -> int:
    _check_runtime_links(args)
    text = " ".join(args.element)
    description = parse_description(text)
    if len(description.items) != 1 or not isinstance(description.items[0], ElementWords):
        raise ConfigError(f"stage: expected one element with properties, got {text!r}")
    stage = build_stage(description.items[0], text)
    if stage.is_source == bool(args.input):
        raise ConfigError(f"stage {stage.factory_name}: " + ("a source takes no --input" if stage.is_source
                                                             else "needs --input"))
    if stage.is_sink == bool(args.output):
        raise ConfigError(f"stage {stage.factory_name}: " + ("a sink takes no --output" if stage.is_sink
                                                           else "needs --output"))
    output_format = None if stage.is_sink else stage.output_format(None) or stage.output_caps
    spec = WorkerSpec(
        stage_target="", properties={}, stage_name=stage.name or stage.factory_name,
        worker_index=args.worker, worker_count=args.workers, output_format=output_format,
        stamp_pages=output_format in PAGE_FORMATS,
        inputs=[InputSpec(args.input)] if args.input else [],
        outputs=[OutputSpec([args.output])] if args.output else [],
        max_inflight=parse_size(args.max_inflight))
    failure: list[Message] = []

    def report(message: Message) -> None:
        if message.kind == "error":
            failure.append(message)
        elif message.kind in ("stats", "warning"):
            fields = message.fields
            text = (f"{message.stage}[{message.worker}] {fields.get('batches_in', 0)} batches in, "
                    f"{fields.get('batches_out', 0)} out, {fields.get('pages_out', 0)} pages out"
                    if message.kind == "stats" else str(message))
            console.print(text, highlight=False)

    code = Worker(spec, stage=stage, local_post=report).run()
    if failure:
        fields = failure[0].fields
        raise StageFailed(failure[0].stage, failure[0].worker, fields.get("reason", ""), fields.get("traceback", ""))
    return code


# ---- the table -------------------------------------------------------------
COMMANDS_GROUP = "pagepipe.commands"
BUILTIN_SUBCOMMANDS: dict[str, Subcommand] = {
    "inspect": Subcommand("list stages, or describe one", add_inspect_arguments, run_inspect),
    "launch": Subcommand("run a pipeline description", add_launch_arguments, run_launch),
    "stage": Subcommand("run one stage on its own, linked by endpoints", add_stage_arguments, run_stage),
}


def subcommands() -> dict[str, Subcommand]:
    """The built-in subcommands, then those of the ``pagepipe.commands`` entry points (an
    entry point names a ``Subcommand`` object)."""
    found = dict(BUILTIN_SUBCOMMANDS)
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda entry: entry.name):
        if entry.name in found:
            continue
        command = entry.load()
        if not isinstance(command, Subcommand):
            raise ConfigError(f"entry point {entry.name} = {entry.value} in {COMMANDS_GROUP} is not a Subcommand")
        found[entry.name] = command
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagepipe", description="Streaming memory checkpoints as a pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in subcommands().items():
        command.add_arguments(commands.add_parser(name, help=command.summary, description=command.summary))
    return parser


def _interrupt_on_sigterm(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pagepipe`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # keep tables on one line in logs
    errors = Console(stderr=True)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return subcommands()[args.command].run(args, console)
    except StageFailed as exc:
        errors.print(f"pagepipe: {exc}", highlight=False, markup=False, soft_wrap=True)
        if exc.traceback:
            errors.print(exc.traceback.rstrip(), highlight=False, markup=False, soft_wrap=True)
        return EXIT_FAILED
    except ConfigError as exc:
        errors.print(f"pagepipe: {exc}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        errors.print("pagepipe: interrupted; every worker stopped", highlight=False)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
