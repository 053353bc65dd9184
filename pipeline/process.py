"""The process executor: one process per stage worker, linked by ZeroMQ PUSH/PULL over ipc://.

The supervisor (this module, in the calling process) creates a private
directory for the ipc endpoints and shared-memory rings (in /dev/shm, named
with its pid so that a later run removes what a killed supervisor left),
starts every worker (forkserver, or spawn; never plain fork), collects bus
messages, and watches every process. When a stage fails or a process dies,
it terminates all workers (SIGTERM, then SIGKILL after a grace period) and
raises StageFailed naming the stage and worker. Stages with
``runs_in_caller`` run as threads of this process, linked by ZeroMQ like any
other worker, so the application can call their methods.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from .bus import Message
from .colocation import as_member
from .errors import ConfigError, CorruptData, StageFailed
from .graph import Plan
from .registry import class_path
from .stage import Stage
from .shm import ring_name
from .worker import InputSpec, OutputSpec, Worker, WorkerSpec, run_worker_process

TERMINATE_GRACE = 2.0
"""Seconds workers get after SIGTERM before SIGKILL."""
EXIT_REPORT_GRACE = 1.0
"""Seconds to wait for a dead worker's last bus messages before judging its exit."""
CALLER_THREAD_LINGER_MS = 5000
SHARED_MEMORY_DIR = "/dev/shm"
"""Where the endpoints and shared-memory rings of a run live (a private directory per run)."""


DIRECTORY_PREFIX = "pagepipe-"


def _remove_orphaned_directories(parent: str) -> None:
    """Remove run directories (rings hold memory in /dev/shm) of supervisors that died without cleaning up."""
    for entry in Path(parent).glob(f"{DIRECTORY_PREFIX}*-*"):
        owner = entry.name[len(DIRECTORY_PREFIX):].split("-", 1)[0]
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"process killed by signal {-code}"
    return f"process exited with code {code} without finishing its stream"


class _Thread:
    """A ``runs_in_caller`` worker: a thread of the supervising process."""

    def __init__(self, worker: Worker, stop_event: threading.Event):
        self.worker = worker
        self.stop_event = stop_event
        self.thread = threading.Thread(target=self._run, name=f"pagepipe-{worker.spec.stage_name}", daemon=True)
        self.exitcode: int | None = None

    def _run(self) -> None:
        self.exitcode = self.worker.run()

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()


class ProcessExecution:
    """Start, watch and stop the workers of a plan in separate processes."""

    def __init__(self, plan: Plan, max_inflight: int, start_method: str = "forkserver", name: str = ""):
        if start_method not in ("forkserver", "spawn"):
            raise ConfigError(f"start method {start_method!r}: use forkserver or spawn (never fork)")
        self.plan = plan
        self.max_inflight = max_inflight
        self.start_method = start_method
        self.name = name or f"pid {os.getpid()}"
        """Shown in the workers' process titles (``pagepipe: xor-delta0 worker 1/2 of NAME``)."""
        self.processes: dict[tuple[str, int], multiprocessing.process.BaseProcess] = {}
        self.threads: dict[tuple[str, int], _Thread] = {}
        self._directory = ""
        self._context: zmq.Context | None = None
        self._bus: zmq.Socket | None = None
        self._finished = False
        self._members = {node.name: frozenset(node.parts) for node in plan.nodes if node.parts}
        """Co-located nodes' members: their messages are relabelled with the member's name (as_member)."""

    @property
    def worker_processes(self) -> int:
        """How many worker processes this execution starts (pipeline.graph.Plan.worker_processes)."""
        return self.plan.worker_processes()

    # ---- start ---------------------------------------------------------
    def specs(self, directory: str) -> list[tuple[WorkerSpec, Stage | None]]:
        """Every worker's spec (and its caller-side stage object, for runs_in_caller stages)."""
        nodes = self.plan.nodes

        def data(node: int, worker: int, upstream_worker: int) -> str:
            return f"ipc://{directory}/d{node}.{worker}.{upstream_worker}"

        def credit(node: int, worker: int) -> str:
            return f"ipc://{directory}/c{node}.{worker}"

        def ring(node: int, worker: int, link: int, downstream_worker: int) -> str:
            return f"{directory}/{ring_name(node, worker, link, downstream_worker)}"

        result = []
        for index, node in enumerate(nodes):
            caller_side = node.stage.runs_in_caller
            properties = node.stage.property_values()
            if not caller_side:
                self._check_picklable(node.name, properties)
            for worker in range(node.workers):
                inputs = []
                if node.upstream is not None:
                    parent = nodes[node.upstream]
                    link = parent.downstream.index(index)
                    inputs = [InputSpec(data(index, worker, up), credit(node.upstream, up), link,
                                        ring(node.upstream, up, link, worker)) for up in range(parent.workers)]
                outputs = [OutputSpec([data(child, w, worker) for w in range(nodes[child].workers)],
                                      nodes[child].stage.shard_key, credited=True,
                                      ring_paths=[ring(index, worker, link, w) for w in range(nodes[child].workers)])
                           for link, child in enumerate(node.downstream)]
                spec = WorkerSpec(
                    stage_target=class_path(type(node.stage)), properties=properties, stage_name=node.name,
                    elements=node.elements,
                    worker_index=worker, worker_count=node.workers, output_format=node.output_format,
                    stamp_pages=node.stamps_pages, inputs=inputs, outputs=outputs,
                    credit_endpoint=credit(index, worker) if node.downstream else None,
                    bus_endpoint=f"ipc://{directory}/bus", max_inflight=self.max_inflight,
                    supervisor_pid=0 if caller_side else os.getpid(),
                    linger_ms=CALLER_THREAD_LINGER_MS if caller_side else -1, pipeline_name=self.name,
                    arena=None if caller_side else (directory, index), output_shards=self.plan.output_shards(index))
                result.append((spec, node.stage if caller_side else None))
        return result

    @staticmethod
    def _check_picklable(name: str, properties: dict) -> None:
        for key, value in properties.items():
            try:
                pickle.dumps(value)
            except Exception as exc:
                raise ConfigError(f"{name}: property {key.replace('_', '-')} ({type(value).__name__}) cannot be "
                                  f"sent to a worker process ({exc}); run inline or use a picklable value") from None

    def launch(self) -> None:
        parent = SHARED_MEMORY_DIR if os.path.isdir(SHARED_MEMORY_DIR) else tempfile.gettempdir()
        _remove_orphaned_directories(parent)
        self._directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-", dir=parent)
        try:
            specs = self.specs(self._directory)
            self._context = zmq.Context()
            self._bus = self._context.socket(zmq.PULL)
            self._bus.linger = 0
            self._bus.bind(f"ipc://{self._directory}/bus")
            context = (multiprocessing.get_context("forkserver") if self.start_method == "forkserver"
                       else multiprocessing.get_context("spawn"))
            if self.start_method == "forkserver":
                context.set_forkserver_preload(["pipeline.worker", "numpy", "zmq"])
            for spec, stage in specs:
                key = (spec.stage_name, spec.worker_index)
                if stage is not None:
                    stop_event = threading.Event()
                    thread = _Thread(Worker(spec, stage=stage, stop_event=stop_event), stop_event)
                    self.threads[key] = thread
                    thread.start()
                else:
                    process = context.Process(target=run_worker_process, args=(spec,),
                                              name=f"pagepipe {spec.stage_name}[{spec.worker_index}]", daemon=True)
                    _start_worker_process(process)
                    self.processes[key] = process
        except BaseException:
            self.shutdown()
            raise

    # ---- watch ---------------------------------------------------------
    def supervise(self, post: Callable[[Message], None], should_stop: Callable[[], bool]) -> None:
        """Forward bus messages until every worker is done; raise StageFailed on the first failure."""
        pending = set(self.processes) | set(self.threads)
        judged: set[tuple[str, int]] = set()
        poller = zmq.Poller()
        poller.register(self._bus, zmq.POLLIN)
        sentinels = {process.sentinel: key for key, process in self.processes.items()}
        for sentinel in sentinels:
            poller.register(sentinel, zmq.POLLIN)
        while pending and not should_stop():
            ready = dict(poller.poll(100))
            self._drain_bus(post, pending)
            for sentinel, key in sentinels.items():
                if sentinel in ready and key not in judged:
                    judged.add(key)
                    poller.unregister(sentinel)
                    self._judge_exit(key, self.processes[key].exitcode, post, pending)
            for key, thread in self.threads.items():
                if key not in judged and not thread.is_alive():
                    judged.add(key)
                    self._judge_exit(key, thread.exitcode, post, pending)
        self._finished = not pending

    def _drain_bus(self, post: Callable[[Message], None], pending: set) -> None:
        bus = self._bus
        assert bus is not None  # bound by launch() before any worker starts
        while True:
            try:
                raw = bus.recv_json(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError as exc:
                raise CorruptData(f"bus: malformed message ({exc})") from None
            message = Message.from_dict(raw)
            if self._members:
                message = as_member(message, self._members)
            post(message)
            key = (message.stage, message.worker)
            if message.kind == "error":
                raise StageFailed(message.stage, message.worker, str(message.fields.get("reason", "")),
                                  str(message.fields.get("traceback", "")), str(message.fields.get("category", "bug")))
            if message.kind == "done":
                pending.discard(key)

    def _judge_exit(self, key: tuple[str, int], code: int | None, post, pending: set) -> None:
        """A worker exited: fine if it said done; otherwise it failed (its error message, or how it died)."""
        deadline = time.monotonic() + EXIT_REPORT_GRACE
        while key in pending and time.monotonic() < deadline:
            self._drain_bus(post, pending)
            if key in pending and self._bus is not None:
                self._bus.poll(20)
        if key in pending:
            process = self.processes.get(key)
            code = process.exitcode if process is not None else code
            raise StageFailed(key[0], key[1], _describe_exit(code))

    # ---- stop ----------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL) and remove the endpoints; safe to call twice.

        After a run where every worker said done, they first get a grace period to exit by themselves.
        """
        deadline = time.monotonic() + TERMINATE_GRACE
        if self._finished:
            for process in self.processes.values():
                process.join(max(0.0, deadline - time.monotonic()))
        for thread in self.threads.values():
            thread.stop_event.set()
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.kill()
                process.join(TERMINATE_GRACE)
        for thread in self.threads.values():
            thread.thread.join(max(0.0, deadline - time.monotonic()))
        if self._bus is not None:
            self._bus.close()
            self._bus = None
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = ""


def _start_worker_process(process: multiprocessing.process.BaseProcess) -> None:
    """Start one worker; a script re-imported in a worker without a ``__main__`` guard gets told how to fix it."""
    try:
        process.start()
    except RuntimeError as exc:
        if "bootstrapping phase" not in str(exc):
            raise
        raise ConfigError("process mode starts worker processes, which import the main script again: put the code "
                          "that builds and runs the pipeline under `if __name__ == \"__main__\":`") from None
