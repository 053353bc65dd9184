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
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from importlib.metadata import entry_points
from typing import Callable, NoReturn, Sequence

from rich.console import Console

from .bus import Message, json_default
from .colocation import POLICIES
from .errors import ConfigError, PagepipeError, ParseError, StageFailed
from .launch import ElementWords, build_stage, parse_description
from .logs import DEFAULT_INTERVAL, LOG_FORMATS, RunLog
from .pipeline import DEFAULT_MAX_INFLIGHT, MODES, Pipeline
from .progress import Progress, print_summary
from .registry import factories, import_target, load
from .routing import PAGE_FORMATS
from .subcommand import Subcommand
from .units import parse_duration, parse_endpoint, parse_size
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
            console.print(f"{name:<16} {description}", highlight=False, soft_wrap=True, markup=False)
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
        console.print(f"{label:<16}{value}", highlight=False, markup=False)
    console.print("Properties:", highlight=False)
    for prop in stage_class.properties().values():
        if prop.internal:  # set by the runtime or by fusion, never by a user
            continue
        default = "required" if prop.required else f"default {prop.default!r}"
        console.print(f"  {prop.name:<18}{prop.type:<10}{default}", highlight=False, markup=False)
        if prop.describe_range():
            console.print(f"  {'':<18}{'':<10}range   {prop.describe_range()}", highlight=False,
                          markup=False)
        console.print(f"  {'':<18}{'':<10}{prop.doc}", highlight=False, markup=False)
    return 0


# ---- logging options shared by launch and stage --------------------------------
def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stats-interval", metavar="DURATION",
                        help="print per-epoch statistics this often (5s; seconds if no unit); without a "
                             f"terminal a status line is written every {DEFAULT_INTERVAL:g} s anyway")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="status and event lines (written when stdout is not a terminal, or with "
                             "--stats-interval) as text or JSON lines")


def _positive_seconds(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        value = parse_duration(text)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if value <= 0:
        raise ConfigError(f"{option} {text!r} must be positive")
    return value


def run_log(args: argparse.Namespace, console: Console, wire_links: list[tuple[str, str]] | None = None,
            order: list[str] | None = None) -> RunLog | None:
    """The status and event log of a run: without a terminal always, on one with --stats-interval."""
    interval = _positive_seconds(args.stats_interval, "--stats-interval")
    if console.is_terminal and interval is None:
        return None
    write = None
    if console.is_terminal:   # above the live table
        def write(line: str) -> None:
            console.print(line, markup=False, emoji=False, highlight=False, soft_wrap=True)
    return RunLog(interval=interval or DEFAULT_INTERVAL, fmt=args.log_format, wire_links=wire_links, write=write,
                  order=order)


def _listeners(*listeners: Callable[[Message], None] | None) -> Callable[[Message], None]:
    chosen = [listener for listener in listeners if listener is not None]

    def post(message: Message) -> None:
        for listener in chosen:
            listener(message)
    return post


# ---- launch ----------------------------------------------------------------
def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("description", nargs="+", help='the pipeline, e.g. "test-src ! identity ! null-sink"')
    parser.add_argument("--mode", choices=MODES, default="process")
    parser.add_argument("--stats-json", type=Path, help="write the statistics (with per-epoch series) as JSON here")
    parser.add_argument("--no-fuse", action="store_true", help="do not fuse neighbouring stages")
    parser.add_argument("--colocate", choices=POLICIES, default="none",
                        help="process mode: which neighbouring single-worker stages share a worker process. "
                             "none: one process per stage worker (default); chains: every run of neighbouring "
                             "single-worker stages shares one; auto: join neighbours (the pair running the fewest "
                             "elements first, then the one furthest downstream) only while there are more worker "
                             "processes than CPUs this process may use. Results are the same either way")
    parser.add_argument("--max-inflight", default=str(DEFAULT_MAX_INFLIGHT), help="bytes in flight per link (32MiB)")
    parser.add_argument("--timeout", metavar="SECONDS", help="stop and fail after this long (seconds, or 2min)")
    parser.add_argument("--name", default="", help="the pipeline's name in its workers' process titles "
                                                   "(default: pid of this process)")
    parser.add_argument("--metrics-port", metavar="[HOST:]PORT",
                        help="serve Prometheus metrics here while running (needs pagepipe[metrics])")
    add_log_arguments(parser)


def _check_output_file(path: Path | None, option: str) -> None:
    """Fail before the run, not after it, when a result file cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {str(path)!r}: not writable")


def run_launch(args: argparse.Namespace, console: Console) -> int:
    timeout = _positive_seconds(args.timeout, "--timeout")
    limit = parse_size(args.max_inflight)
    if limit <= 0:
        raise ConfigError(f"--max-inflight {args.max_inflight!r} must be positive")
    _check_output_file(args.stats_json, "--stats-json")
    pipeline = Pipeline.parse(" ".join(args.description))
    plan = pipeline.plan(fuse=not args.no_fuse)
    log = run_log(args, console, plan.wire_links(), plan.names())
    metrics = None
    if args.metrics_port:
        from .metrics import MetricsExporter
        metrics = MetricsExporter(args.metrics_port)
    try:
        with Progress(console, show_warnings=log is None) as progress, log or contextlib.nullcontext():
            try:
                result = pipeline.run(mode=args.mode, on_message=_listeners(progress, log, metrics), timeout=timeout,
                                      fuse=not args.no_fuse, max_inflight=limit, name=args.name,
                                      colocate=args.colocate)
            except TimeoutError:
                raise PagepipeError(f"--timeout {args.timeout}: the pipeline had not finished; every worker "
                                    "was stopped (give a longer --timeout, or none)") from None
    finally:
        if metrics is not None:
            metrics.close()
    processes = pipeline.plan(fuse=not args.no_fuse, colocate=args.colocate).worker_processes()
    if log is not None and log.fmt == "json":
        summary = result.to_json()
        summary.pop("timeline")
        if args.mode != "inline":
            summary.update(worker_processes=processes, colocate=args.colocate)
        print(json.dumps({"type": "summary", **summary}, default=json_default), flush=True)
    else:
        print_summary(console, result)
        if args.mode != "inline":
            print_processes(console, result, processes, len(plan.element_names()), args.colocate)
    if args.stats_json:
        try:
            args.stats_json.write_text(json.dumps(result.to_json(), indent=2, default=json_default))
        except OSError as exc:
            raise PagepipeError(f"--stats-json {str(args.stats_json)!r}: cannot write: {exc.strerror}") from None
    return 0


def print_processes(console: Console, result, processes: int, elements: int, colocate: str) -> None:
    """How many worker processes the run started for how many elements (fused and co-located elements share
    one; caller-side stages are threads of this process) and their CPU seconds."""
    workers = {(stats.get("fused_as", stage), worker): float(stats.get("cpu_seconds", 0.0))
               for (stage, worker), stats in result.statistics.items()}
    console.print(f"{processes} worker process{'' if processes == 1 else 'es'} for {elements} elements "
                  f"(colocate={colocate}), "
                  f"{sum(workers.values()):.2f} CPU seconds in them", highlight=False)


# ---- stage -----------------------------------------------------------------
def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("element", nargs="+", help="NAME [prop=value ...]")
    parser.add_argument("--input", help="endpoint to receive batches on (binds; '>tcp://host:port' connects)")
    parser.add_argument("--output", help="endpoint to send batches to (connects; '@tcp://*:port' binds)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (for sharded stages)")
    parser.add_argument("--workers", type=int, default=1, help="how many workers of this stage run")
    parser.add_argument("--max-inflight", default=str(DEFAULT_MAX_INFLIGHT), help="bytes queued per link (32MiB)")
    add_log_arguments(parser)
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
    text = " ".join(args.element)
    description = parse_description(text)
    if len(description.items) != 1 or not isinstance(description.items[0], ElementWords):
        raise ConfigError(f"stage: expected one element with properties, got {text!r}")
    if not 1 <= args.workers <= 64 or not 0 <= args.worker < args.workers:
        raise ConfigError(f"stage: --worker {args.worker} --workers {args.workers}: need 0 <= worker < workers <= 64")
    for option, endpoint in (("--input", args.input), ("--output", args.output)):
        if endpoint:
            try:
                parse_endpoint(endpoint)
            except ConfigError as exc:
                raise ConfigError(f"stage {option}: {exc}") from None
    _check_runtime_links(args)
    limit = parse_size(args.max_inflight)
    if limit <= 0:
        raise ConfigError(f"--max-inflight {args.max_inflight!r} must be positive")
    stage = build_stage(description.items[0], text)
    try:
        stage.check()
    except ConfigError as exc:
        raise ParseError(str(exc), text, description.items[0].factory.position) from None
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
        max_inflight=limit)
    failure: list[Message] = []
    log = run_log(args, console)

    def report(message: Message) -> None:
        if message.kind == "error":
            failure.append(message)
        elif log is not None:
            log(message)
        elif message.kind in ("stats", "warning", "event"):
            fields = message.fields
            text = (f"{message.stage}[{message.worker}] {fields.get('batches_in', 0)} batches in, "
                    f"{fields.get('batches_out', 0)} out, {fields.get('pages_out', 0)} pages out"
                    if message.kind == "stats" else str(fields.get("message", message)))
            console.print(text, highlight=False, markup=False, emoji=False)

    with log or contextlib.nullcontext():
        code = Worker(spec, stage=stage, local_post=report).run()
    if failure:
        fields = failure[0].fields
        raise StageFailed(failure[0].stage, failure[0].worker, fields.get("reason", ""), fields.get("traceback", ""),
                          str(fields.get("category", "bug")))
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
        try:
            command = entry.load()
        except Exception as exc:   # one broken package must not take every command down
            command = _unavailable(f"{entry.name} = {entry.value} cannot be loaded ({type(exc).__name__}: {exc})")
        if not isinstance(command, Subcommand):
            command = _unavailable(f"entry point {entry.name} = {entry.value} in {COMMANDS_GROUP} is not a Subcommand")
        found[entry.name] = command
    return found


def _unavailable(reason: str) -> Subcommand:
    """A subcommand that cannot run, saying why when asked to."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("arguments", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace, console: Console) -> int:
        raise ConfigError(reason)
    return Subcommand(f"(unavailable: {reason})", add_arguments, run)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line naming the argument at fault (exit 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} ({self.prog} --help shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pagepipe", description="Streaming memory checkpoints as a pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in subcommands().items():
        command.add_arguments(commands.add_parser(name, help=command.summary, description=command.summary))
    return parser


def _interrupt_on_sigterm(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


SHOW_TRACEBACKS = "PAGEPIPE_TRACEBACK"
"""Set this environment variable to 1 to see the traceback of an unexpected error."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pagepipe`` console script; returns the exit code.

    Whatever a user types is answered with one line, never a traceback: 2 for a configuration
    error (what was wrong and what to do), 1 for a failure while running, 130 when interrupted.
    A stage's own bug (not a PagepipeError) also shows the stage's traceback.
    """
    errors = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)

    def say(text: str) -> None:
        errors.print(text, markup=False, emoji=False, highlight=False, soft_wrap=True)

    try:
        parser = build_parser()
    except ConfigError as exc:
        say(f"pagepipe: {exc}")
        return EXIT_CONFIG
    args = parser.parse_args(argv)
    console = Console(emoji=False)
    if not console.is_terminal:
        console.width = max(console.width, 200)  # keep tables on one line in logs
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return subcommands()[args.command].run(args, console)
    except StageFailed as exc:
        say(f"pagepipe: {exc}")
        if exc.category == "config":
            return EXIT_CONFIG
        if exc.traceback and (exc.category == "bug" or os.environ.get(SHOW_TRACEBACKS)):
            say(exc.traceback.rstrip())
        return EXIT_FAILED
    except ConfigError as exc:
        say(f"pagepipe: {exc}")
        return EXIT_CONFIG
    except PagepipeError as exc:
        say(f"pagepipe: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        say("pagepipe: interrupted; every worker stopped")
        return EXIT_INTERRUPTED
    except OSError as exc:   # a file or socket the user named
        where = f" {exc.filename!r}" if exc.filename else ""
        say(f"pagepipe: {exc.strerror or exc}{where}")
        return EXIT_FAILED
    except Exception as exc:  # a bug: say so in one line; the traceback on request
        if os.environ.get(SHOW_TRACEBACKS):
            raise
        say(f"pagepipe: unexpected {type(exc).__name__}: {exc} (a bug in pagepipe; {SHOW_TRACEBACKS}=1 "
            "shows where)")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
