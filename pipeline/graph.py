"""The pipeline graph: elements, links, and the checked plan the executors run.

``Pipeline`` is the Python API (documented in ``pipeline.pipeline``); ``plan``
turns it into ``Node``s in topological order after checking that every link
agrees on its batch format, and fuses neighbours whose stages offer it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .batch import ANY, STREAM
from .errors import CapsError, ConfigError
from .routing import PAGE_FORMATS, SHARDABLE_FORMATS
from .stage import Stage


@dataclass
class Node:
    """One element as the executors see it: a template stage and its place in the graph."""

    stage: Stage
    name: str
    workers: int
    input_format: str | None
    output_format: str | None
    upstream: int | None = None
    downstream: list[int] = field(default_factory=list)
    elements: list[str] = field(default_factory=list)
    """The original elements this node runs: its own name, or every element fused into it, in order."""
    parts: list[str] = field(default_factory=list)
    """The plan nodes co-located in this node's process, by name, in order (pipeline.colocation); empty if none."""

    def __post_init__(self) -> None:
        self.elements = self.elements or [self.name]

    @property
    def stamps_pages(self) -> bool:
        """Whether the runtime counts this node's pages into its epoch ends."""
        return self.output_format in PAGE_FORMATS


@dataclass
class Plan:
    nodes: list[Node]

    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def output_shards(self, index: int) -> int:
        """Workers node ``index``'s single downstream stage splits pages among by page number, else 1."""
        node = self.nodes[index]
        if len(node.downstream) != 1:
            return 1
        child = self.nodes[node.downstream[0]]
        return child.workers if child.stage.shard_key == "page" else 1

    def wire_links(self) -> list[tuple[str, str]]:
        """Where the framed stream's bytes are counted: (node, "bytes_out") of nodes emitting it,
        (node, "bytes_in") of nodes taking it, in plan order (pipeline.epoch_stats)."""
        links = []
        for node in self.nodes:
            if node.output_format == STREAM:
                links.append((node.name, "bytes_out"))
            if node.input_format == STREAM:
                links.append((node.name, "bytes_in"))
        return links

    def worker_processes(self) -> int:
        """How many processes the process executor starts for this plan (caller-side stages run as threads)."""
        return sum(node.workers for node in self.nodes if not node.stage.runs_in_caller)

    def element_names(self) -> list[str]:
        """Every original element, in order (the members of fused nodes one by one)."""
        return [element for node in self.nodes for element in node.elements]


def _caps_text(stage: Stage) -> str:
    return "|".join(stage.input_caps) if stage.input_caps else "nothing (a source)"


def build_plan(elements: list[Stage], links: list[tuple[Stage, Stage]], fuse: bool = True,
               where: dict[int, str] | None = None) -> Plan:
    """Check the graph and return its nodes in topological order.

    ``where`` maps ``id(stage)`` to a text (a caret line) appended to errors
    about that stage, so launch-string errors point at the offending word.
    """
    where = where or {}

    def fail(error: type[ConfigError], stage: Stage, message: str) -> ConfigError:
        return error(message + where.get(id(stage), ""))

    if not elements:
        raise ConfigError("the pipeline has no elements")
    for stage in elements:
        try:
            stage.check()
        except ConfigError as exc:
            raise fail(ConfigError, stage, str(exc)) from None
    upstream: dict[int, Stage] = {}
    downstream: dict[int, list[Stage]] = {id(stage): [] for stage in elements}
    for source, target in links:
        if id(target) in upstream:
            raise fail(ConfigError, target, f"{target.name} has two upstream elements ({upstream[id(target)].name}, "
                                            f"{source.name}); merging branches is not supported")
        upstream[id(target)] = source
        downstream[id(source)].append(target)

    order: list[Stage] = []
    for stage in elements:
        if id(stage) in upstream:
            continue
        if not stage.is_source:
            raise fail(ConfigError, stage, f"{stage.name} ({stage.factory_name}) needs an upstream element")
        frontier = [stage]
        while frontier:
            current = frontier.pop(0)
            order.append(current)
            frontier.extend(downstream[id(current)])
    if len(order) != len(elements):
        unreached = [stage.name for stage in elements if all(stage is not s for s in order)]
        raise ConfigError(f"elements {', '.join(unreached)} are not reached from any source (a cycle?)")

    formats: dict[int, str | None] = {}
    nodes: list[Node] = []
    index_of: dict[int, int] = {}
    for stage in order:
        parent = upstream.get(id(stage))
        input_format = None
        if parent is not None:
            input_format = formats[id(parent)]
            if stage.is_source:
                raise fail(CapsError, stage, f"cannot link {parent.name} to {stage.name}: {stage.name} is a source")
            if input_format is None:
                raise fail(CapsError, stage, f"cannot link {parent.name} to {stage.name}: {parent.name} is a sink")
            if not stage.accepts(input_format):
                raise fail(CapsError, stage,
                           f"cannot link {parent.name} ({parent.factory_name}, produces {input_format}) "
                           f"to {stage.name} ({stage.factory_name}, accepts {_caps_text(stage)})")
        output_format = stage.output_format(input_format)
        formats[id(stage)] = output_format
        if output_format is not None and not downstream[id(stage)]:
            raise fail(ConfigError, stage, f"the output of {stage.name} ({output_format}) is not linked; "
                                           "end the chain with a sink such as null-sink")
        _check_workers(stage, input_format, fail)
        index_of[id(stage)] = len(nodes)
        nodes.append(Node(stage, stage.name, stage.workers, input_format, output_format,
                          upstream=index_of[id(parent)] if parent is not None else None))
        if parent is not None:
            nodes[index_of[id(parent)]].downstream.append(index_of[id(stage)])
    plan = Plan(nodes)
    return fuse_neighbours(plan) if fuse else plan


def _check_workers(stage: Stage, input_format: str | None,
                   fail: Callable[[type[ConfigError], Stage, str], ConfigError]) -> None:
    if stage.workers > 1 and stage.runs_in_caller:
        raise fail(ConfigError, stage,
                   f"{stage.name} runs in the calling process and cannot have workers={stage.workers}")
    if stage.workers > 1 and stage.shard_key == "page" and input_format not in SHARDABLE_FORMATS + (ANY,):
        raise fail(ConfigError, stage, f"{stage.name} shards by page but receives {input_format} batches, "
                                       f"which cannot be split by page (only {', '.join(SHARDABLE_FORMATS)})")


def fuse_neighbours(plan: Plan) -> Plan:
    """Replace each link a -> b where ``a.fuse(b)`` offers a stage by that stage (with a's workers).

    Merging stages never changes results (pipeline.fusion): only a stage whose
    own class defines ``fuse`` is asked, and the fused stage must account for
    every element it replaces, so their statistics keep their names.
    """
    nodes = plan.nodes
    alive = [True] * len(nodes)
    for index, node in enumerate(nodes):
        while alive[index] and len(node.downstream) == 1:
            child_index = node.downstream[0]
            below = nodes[child_index]
            fused = node.stage.fuse(below.stage) if declares_fuse(node.stage) else None
            if fused is None:
                break
            elements = node.elements + below.elements
            members = len(fused.fusion.members) if fused.fusion is not None else 0
            if members != len(elements):
                raise ConfigError(f"{type(node.stage).__qualname__}.fuse: the fused stage accounts for {members} "
                                  f"elements, not {len(elements)} ({', '.join(elements)}); give it a "
                                  "pipeline.fusion.Fusion with one member per element")
            fused.workers = node.workers
            fused.name = f"{node.name}+{below.name}"
            node.stage, node.name, node.elements = fused, fused.name, elements
            node.output_format = below.output_format
            node.downstream = below.downstream
            alive[child_index] = False
    keep = [i for i, live in enumerate(alive) if live]
    renumber = {old: new for new, old in enumerate(keep)}
    fused_nodes = []
    for old in keep:
        node = nodes[old]
        node.downstream = [renumber[d] for d in node.downstream]
        fused_nodes.append(node)
    for index, node in enumerate(fused_nodes):
        for child in node.downstream:
            fused_nodes[child].upstream = index
    return Plan(fused_nodes)


def declares_fuse(stage: Stage) -> bool:
    """Whether the stage's own class defines ``fuse`` (an inherited one may not fit what a subclass does)."""
    return "fuse" in vars(type(stage))
