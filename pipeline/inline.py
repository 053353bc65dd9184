"""The inline executor: every stage worker in the calling process, batches passed by direct calls.

Same semantics as the process executor (N stage instances for workers=N,
page sharding, fan-in barriers, epoch-end stamping, statistics); no sockets,
so it is the place to debug a stage.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Iterator

from .batch import Batch
from .bus import STATS_INTERVAL, Message
from .core import WorkerCore
from .errors import StageFailed, error_category
from .graph import Node, Plan
from .routing import Router
from .stage import Stage, StageContext


def worker_instances(node: Node) -> list[Stage]:
    """The stage objects of a node's workers: the element itself when it has one worker."""
    if node.workers == 1:
        return [node.stage]
    return [type(node.stage)(**node.stage.property_values()) for _ in range(node.workers)]


class InlineExecution:
    """Run a plan in this process; ``supervise`` returns when every source is exhausted."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.cores: list[list[WorkerCore]] = []

    def launch(self) -> None:
        """Nothing to start ahead: stages start in ``supervise``, in the thread that runs them."""

    def shutdown(self) -> None:
        """Nothing outlives ``supervise``."""

    def supervise(self, post: Callable[[Message], None], should_stop: Callable[[], bool]) -> None:
        self._post = post
        self._build()
        started: list[WorkerCore] = []
        try:
            for cores in self.cores:
                for core in cores:
                    self._guard(core, core.start)
                    started.append(core)
            self._run_sources(should_stop)
        except BaseException:
            self._stop(started, report=False)
            raise
        self._stop(started, report=True)
        self._post_statistics(final=True)

    def _build(self) -> None:
        nodes = self.plan.nodes
        self.cores = [[] for _ in nodes]
        for index in reversed(range(len(nodes))):
            node = nodes[index]
            for worker, stage in enumerate(worker_instances(node)):
                context = StageContext(node.name, worker, node.workers, post=self._poster(node.name, worker),
                                       output_shards=self.plan.output_shards(index))
                inputs = nodes[node.upstream].workers if node.upstream is not None else 1
                emit = self._emitter(node, worker)
                self.cores[index].append(
                    WorkerCore(stage, context, inputs, node.output_format, emit, node.stamps_pages, node.elements))

    def _poster(self, stage: str, worker: int) -> Callable[..., None]:
        return lambda kind, **fields: self._post(Message(kind, stage, worker, fields))

    def _emitter(self, node: Node, worker: int) -> Callable[[Batch], None]:
        targets = [(self.cores[child], Router(self.plan.nodes[child].workers, self.plan.nodes[child].stage.shard_key))
                   for child in node.downstream]

        def emit(batch: Batch) -> None:
            for cores, router in targets:
                for index, part in router.route(batch):
                    core = cores[index]
                    self._guard(core, core.feed, worker, part)
        return emit

    def _guard(self, core: WorkerCore, call: Callable, *args) -> object:
        """Run stage code; a failure becomes StageFailed naming the stage and worker."""
        try:
            return call(*args)
        except StageFailed:
            raise
        except Exception as exc:
            context = core.context
            raise StageFailed(context.stage_name, context.worker_index, f"{type(exc).__name__}: {exc}",
                              traceback.format_exc(), error_category(exc)) from exc

    def _run_sources(self, should_stop: Callable[[], bool]) -> None:
        running: list[tuple[WorkerCore, Iterator[None]]] = [
            (core, core.produce()) for node, cores in zip(self.plan.nodes, self.cores) if node.upstream is None
            for core in cores]
        every_core = [core for cores in self.cores for core in cores]
        last_stats = time.monotonic()
        while running:
            for entry in list(running):
                core, steps = entry
                if self._guard(core, next, steps, StopIteration) is StopIteration:
                    running.remove(entry)
            for core in every_core:   # timers, between source batches (waiting sources yield None often enough)
                if core.stage.tick_interval > 0:
                    self._guard(core, core.tick)
            if should_stop():
                return
            if time.monotonic() - last_stats >= STATS_INTERVAL:
                last_stats = time.monotonic()
                self._post_statistics(final=False)

    def _post_statistics(self, final: bool) -> None:
        for node, cores in zip(self.plan.nodes, self.cores):
            for core in cores:
                records = core.epoch_records()
                if records:
                    self._post(Message("epochs", node.name, core.context.worker_index, {"records": records}))
                for element, stats in core.statistics():
                    self._post(Message("stats", element, core.context.worker_index, stats))
                if final and node.output_format is None:
                    self._post(Message("eos", node.name, core.context.worker_index))
                if final:
                    self._post(Message("done", node.name, core.context.worker_index))

    def _stop(self, started: list[WorkerCore], report: bool) -> None:
        """Stop every started stage; the first failure is raised when ``report`` (not while another propagates)."""
        failure = None
        for core in started:
            try:
                self._guard(core, core.stop)
            except StageFailed as exc:
                failure = failure or exc
        if failure is not None and report:
            raise failure
