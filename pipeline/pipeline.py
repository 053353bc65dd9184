"""The Python API: build a pipeline, run it, watch its bus.

Build::

    p = Pipeline.parse("test-src epochs=3 ! identity workers=2 ! null-sink")
    p = Pipeline.chain(TestSource(epochs=3), Identity(workers=2), NullSink())
    p = Pipeline(); src = p.add(TestSource()); sink = p.add(NullSink()); p.link(src, sink)
    p.stage("identity0")          # an element by name (names are given as elements are added)

Elements are templates: workers are rebuilt from their class and property
values (in their own processes, or as N instances for workers=N), except a
single-worker element run inline and a ``runs_in_caller`` stage, which run as
the very object added.

Run (blocking)::

    result = p.run(mode="process", on_message=print, timeout=60)   # RunResult; StageFailed on failure
    result.totals("null-sink0")["pages_in"]

Run (non-blocking), e.g. to call a caller-side stage's ``checkpoint()`` meanwhile::

    with p.start(mode="process") as handle:
        for message in handle.messages(): ...   # until the pipeline ends
        result = handle.wait(timeout=10)        # TimeoutError if still running; StageFailed on failure
    # leaving the block (or handle.stop()) stops every worker

``mode="inline"`` runs every worker in this process (``run`` runs it in the
calling thread, ``start`` in a background thread). ``fuse=False`` keeps
fusable neighbours (xor-delta ! rle) apart; ``colocate`` says how many
processes process mode starts: ``"none"`` (one per stage worker),
``"chains"`` (each run of neighbouring single-worker stages shares one) or
``"auto"`` (join neighbours only while there are more processes than CPUs);
see pipeline.colocation. ``handle.worker_processes`` (and
``p.plan(colocate=...).worker_processes()``) tells how many it starts; ``max_inflight`` bounds the bytes
in flight on each link between two workers. ``on_message`` is called from the
thread that supervises the run. Validation (formats, properties, graph) happens
before anything starts and raises ConfigError / CapsError / ParseError.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from .bus import Collector, Message, RunResult
from .colocation import POLICIES, colocate as colocate_plan
from .errors import ConfigError
from .graph import Plan, build_plan
from .inline import InlineExecution
from .launch import caret, parse_description, resolve
from .process import ProcessExecution
from .stage import Stage
from .units import parse_size

DEFAULT_MAX_INFLIGHT = 32 << 20
MODES = ("inline", "process")


class Pipeline:
    """Elements and links; ``run`` or ``start`` executes them inline or in processes."""

    def __init__(self) -> None:
        self._elements: list[Stage] = []
        self._links: list[tuple[Stage, Stage]] = []
        self._where: dict[int, str] = {}

    # ---- building --------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        """A pipeline from a launch string; ParseError/CapsError point at the offending word."""
        stages, links, positions = resolve(parse_description(text))
        pipeline = cls()
        for stage in stages:
            pipeline.add(stage)
            pipeline._where[id(stage)] = caret(text, positions[id(stage)])
        for upstream, downstream in links:
            pipeline.link(upstream, downstream)
        pipeline.plan()
        return pipeline

    @classmethod
    def chain(cls, *stages: Stage) -> "Pipeline":
        """Stages linked one after another."""
        pipeline = cls()
        for stage in stages:
            pipeline.add(stage)
        for upstream, downstream in zip(stages, stages[1:]):
            pipeline.link(upstream, downstream)
        return pipeline

    def add(self, stage: Stage) -> Stage:
        """Add an element; one without a name gets ``<factory><n>`` (``identity0``)."""
        if not isinstance(stage, Stage):
            raise ConfigError(f"pipeline elements must be Stage objects, got {type(stage).__name__}")
        if not stage.factory_name:
            raise ConfigError(f"{type(stage).__qualname__} has no factory_name: set one on the class "
                              "(factory_name = \"my-stage\"), it names the element and its messages")
        if any(stage is element for element in self._elements):
            return stage
        if not stage.name:
            count = sum(1 for element in self._elements if element.factory_name == stage.factory_name)
            while any(element.name == f"{stage.factory_name}{count}" for element in self._elements):
                count += 1
            stage.name = f"{stage.factory_name}{count}"
        elif any(element.name == stage.name for element in self._elements):
            raise ConfigError(f"two elements are named {stage.name!r}")
        self._elements.append(stage)
        return stage

    def link(self, upstream: Stage | str, downstream: Stage | str) -> None:
        """Link two elements (objects or names); adds objects not yet in the pipeline."""
        source = self.add(upstream) if isinstance(upstream, Stage) else self.stage(upstream)
        target = self.add(downstream) if isinstance(downstream, Stage) else self.stage(downstream)
        self._links.append((source, target))

    def stage(self, name: str) -> Stage:
        """The element named ``name``."""
        for element in self._elements:
            if element.name == name:
                return element
        raise ConfigError(f"no element is named {name!r}; elements: {', '.join(e.name for e in self._elements)}")

    @property
    def elements(self) -> list[Stage]:
        return list(self._elements)

    def plan(self, fuse: bool = True, colocate: str = "none") -> Plan:
        """Check the graph and formats; the nodes the executors run (process mode: co-located as
        ``colocate`` says)."""
        return colocate_plan(build_plan(self._elements, self._links, fuse=fuse, where=self._where), colocate)

    # ---- running ---------------------------------------------------------
    def start(self, mode: str = "process", on_message: Callable[[Message], None] | None = None,
              fuse: bool = True, max_inflight: int | str = DEFAULT_MAX_INFLIGHT,
              start_method: str = "forkserver", name: str = "", colocate: str = "none") -> "PipelineHandle":
        """Start in the background; returns a handle (messages, wait, stop)."""
        handle = self._prepare(mode, on_message, fuse, max_inflight, start_method, name, colocate)
        handle._start_thread()
        return handle

    def run(self, mode: str = "process", on_message: Callable[[Message], None] | None = None,
            timeout: float | None = None, fuse: bool = True, max_inflight: int | str = DEFAULT_MAX_INFLIGHT,
            start_method: str = "forkserver", name: str = "", colocate: str = "none") -> RunResult:
        """Run to the end in the calling thread; StageFailed if a stage fails, TimeoutError after ``timeout``.

        ``name`` appears in the worker processes' titles (``pagepipe: xor-delta0 worker 1/2 of NAME``).
        """
        handle = self._prepare(mode, on_message, fuse, max_inflight, start_method, name, colocate)
        return handle._run_here(timeout)

    def _prepare(self, mode: str, on_message, fuse: bool, max_inflight: int | str,
                 start_method: str, name: str = "", colocate: str = "none") -> "PipelineHandle":
        if mode not in MODES:
            raise ConfigError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if colocate not in POLICIES:
            raise ConfigError(f"colocate={colocate!r}: use one of {', '.join(POLICIES)}")
        plan = self.plan(fuse=fuse)   # names and links as the elements report them, co-located or not
        limit = parse_size(max_inflight)
        if limit <= 0:
            raise ConfigError(f"max-inflight {max_inflight!r} must be positive")
        execution = (InlineExecution(plan) if mode == "inline"   # one process already
                     else ProcessExecution(colocate_plan(plan, colocate), limit, start_method, name))
        return PipelineHandle(execution, Collector([on_message], stage_order=plan.element_names(),
                                                   wire_links=plan.wire_links(), epoch_order=plan.names()))


class PipelineHandle:
    """A started pipeline: its messages, its end, and a way to stop it."""

    def __init__(self, execution: InlineExecution | ProcessExecution, collector: Collector):
        self._execution = execution
        self._collector = collector
        self._messages: queue.Queue[Message | None] = queue.Queue()
        collector.listeners.append(self._messages.put)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _supervise(self) -> None:
        try:
            self._execution.supervise(self._collector.post, self._stop.is_set)
        except BaseException as exc:
            self._failure = exc
        finally:
            self._execution.shutdown()
            self._messages.put(None)

    def _start_thread(self) -> None:
        self._execution.launch()
        self._thread = threading.Thread(target=self._supervise, name="pagepipe-supervisor", daemon=True)
        self._thread.start()

    def _run_here(self, timeout: float | None) -> RunResult:
        self._execution.launch()
        timer = threading.Timer(timeout, self._stop.set) if timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            self._execution.supervise(self._collector.post, self._stop.is_set)
        finally:
            self._execution.shutdown()
            self._messages.put(None)
        if timer is not None:
            timer.cancel()
            if self._stop.is_set():
                raise TimeoutError(f"pipeline still running after {timeout} s; stopped")
        return self._collector.result()

    @property
    def worker_processes(self) -> int:
        """How many worker processes this run starts (0 inline: everything runs in this process)."""
        execution = self._execution
        return execution.worker_processes if isinstance(execution, ProcessExecution) else 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def messages(self) -> Iterator[Message]:
        """Every bus message, until the pipeline has ended."""
        while (message := self._messages.get()) is not None:
            yield message

    def wait(self, timeout: float | None = None) -> RunResult:
        """The final statistics once the pipeline ends; re-raises its failure (StageFailed)."""
        if self._thread is None:
            raise RuntimeError("wait() is for a pipeline started with start(); run() waits by itself")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"pipeline still running after {timeout} s")
        if self._failure is not None:
            raise self._failure
        return self._collector.result()

    def stop(self) -> None:
        """Stop every worker now (idempotent); messages() then ends."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "PipelineHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
