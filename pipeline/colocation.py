"""Co-location: neighbouring stages sharing one worker process, which never changes results.

The process executor runs every plan node in processes of its own; on a
machine with fewer cores than nodes that costs a context switch and a hop per
batch for nothing. ``colocate`` (a policy the user chooses, ``Pipeline.run(
colocate=...)``, ``pagepipe launch --colocate``) joins a linear chain of
neighbouring nodes into one node whose stage is a ``Colocated``: it runs the
members' own code one after another, each member's output fed straight into
the next member's ``handle``, a source member's ``produce`` driving the rest.

Policies:

- ``none`` (the default): one process per node (per worker), as always;
- ``chains``: every run of neighbouring joinable nodes shares one process;
- ``auto``: while the pipeline would start more worker processes than the
  CPUs this process may use (``os.sched_getaffinity``), join the joinable
  neighbouring pair whose joined group runs the fewest elements (a fused
  node counts its elements), on a tie the pair furthest downstream; stop
  when the processes fit the CPUs or nothing more can join. So light tails
  (frame ! sink) join first and a pipeline that fits its CPUs is left alone.

What joins: a link ``a -> b`` where both run one worker in a process of
their own and ``b`` is ``a``'s only downstream element. Never joined:
``runs_in_caller`` stages (they run as threads of the application, which
calls their methods), stages with ``workers > 1`` (their pages are split
among processes by the runtime), a node's several downstream links (each
branch needs its own router and flow control; the node may still end a
chain), and a stage whose property values cannot be pickled (it fails with
its own clear error when its process starts). Fusion happens first
(``classify ! xor-delta ! rle`` is one node, and one member here).

Merging stages never changes results (pipeline.fusion), so a member sees
exactly what it would see in a process of its own: its own ``StageContext``
(its node's name: warnings, events and errors name it), the batches of its
upstream member with epoch ends stamped by the runtime's page counter, its
timer (``tick``) on its own schedule, ``stop`` even when another member
failed. Its statistics, counters and per-epoch records keep its name; only
time figures (busy, CPU) are the shared process's. ``allocate`` and
``output_shards`` come from the worker (an inner member's next stage has one
worker: ``output_shards`` 1). Bus messages of members travel with a
``MEMBER_FIELD`` the supervisor turns back into the member's name
(``as_member``), so ``StageFailed`` names the member, not the process. A
member's failure is reported once every member has stopped: the supervisor
ends every process as soon as it hears of one. A process that dies (a
signal) is reported under its node's name, which lists its members.
"""
from __future__ import annotations

import collections
import os
import pickle
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .batch import ANY, Batch, Flag
from .bus import STATS_INTERVAL, Message
from .epoch_stats import EpochCounter, EpochRecorder
from .errors import ConfigError, error_category
from .fusion import Fusion, Traffic
from .graph import Node, Plan
from .routing import EpochPageCounter
from .stage import Property, Stage, StageContext
from .worker import Stopped

POLICIES = ("none", "chains", "auto")
"""``colocate=`` values: see the module's docstring."""
MEMBER_FIELD = "colocated_member"
"""Field of a bus message a co-located member posts: its node's name (the supervisor relabels the message)."""
RECORDS_INTERVAL = STATS_INTERVAL
"""Seconds between posts of the members' per-epoch records (the worker posts its own as often)."""
SEPARATOR = ","
"""Joins the members' names into the co-located node's name (``test-src0,identity0``; fused names use +)."""


@dataclass
class PartSpec:
    """One co-located plan node, as a worker rebuilds it: its stage class and property values, its name and
    elements, and whether the runtime stamps page counts on its epoch ends."""

    stage_class: type[Stage]
    properties: dict[str, Any]
    name: str
    elements: list[str]
    output_format: str | None
    stamps_pages: bool


@dataclass
class _Part:
    """A member while it runs: its stage, context, traffic in and out, epoch counting, timer."""

    spec: PartSpec
    stage: Stage
    context: StageContext
    inputs: Traffic
    outputs: Traffic
    page_counter: EpochPageCounter | None
    epochs: EpochCounter = field(default_factory=EpochCounter)
    next_tick: float = 0.0
    finished: bool = False

    def close_epoch(self, epoch: int) -> None:
        self.epochs.close(self.context.recorder, epoch, self.inputs.bytes, self.outputs.bytes,
                          self.inputs.pages, self.outputs.pages)


class _Discarded(EpochRecorder):
    """The worker's own per-epoch records of a co-located node: its members record theirs under their names."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = collections.deque(maxlen=0)


class Colocated(Stage):
    """Neighbouring plan nodes run one after another in one worker (built by ``colocate``; see the module)."""

    factory_name = "colocated"
    description = "neighbouring elements sharing one worker process (built by pagepipe; never in a launch string)"
    input_caps = (ANY,)
    output_caps = ANY
    parts = Property("object", None, "Set by co-location: a PartSpec per member, in order", internal=True)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        specs = self.parts
        if not isinstance(specs, list) or len(specs) < 2 or not all(isinstance(s, PartSpec) for s in specs):
            raise ConfigError(f"{self.factory_name}: built by co-location with two or more members (parts=)")
        first = specs[0].stage_class
        setattr(self, "input_caps", first.input_caps)   # per instance: what the members take and make
        setattr(self, "output_caps", specs[-1].output_format)
        setattr(self, "back_to_back", first.back_to_back)
        self._parts: list[_Part] = []
        self._input = Traffic()
        self._output = Traffic()
        self._failure: dict[str, str] | None = None
        self._next_records = 0.0

    # ---- lifecycle -------------------------------------------------------
    def start(self, context: StageContext) -> None:
        super().start(context)
        context.recorder = _Discarded()
        specs: list[PartSpec] = self.parts
        last = len(specs) - 1
        for index, spec in enumerate(specs):
            try:
                stage = spec.stage_class(**spec.properties)
                member = StageContext(spec.name, context.worker_index, context.worker_count,
                                      post=_member_post(context.post, spec.name), allocate=context.allocate,
                                      output_shards=context.output_shards if index == last else 1)
                inputs = self._parts[-1].outputs if self._parts else self._input
                self._parts.append(_Part(spec, stage, member, inputs, self._output if index == last else Traffic(),
                                         EpochPageCounter() if spec.stamps_pages and index < last else None))
                stage.context = member
                stage.start(member)
            except BaseException as exc:
                raise self._failed(index, exc)
        self.fusion = self._fusion()
        self._update_interval()

    def _fusion(self) -> Fusion:
        """One member per original element: the members' own (fused) members, joined by the inner links."""
        members: list[Stage] = []
        links: list[Traffic] = []
        for index, part in enumerate(self._parts):
            own = part.stage.fusion or Fusion([part.stage])
            if len(own.members) != len(part.spec.elements):
                raise ConfigError(f"{part.spec.name}: its fused stage accounts for {len(own.members)} elements, "
                                  f"not {len(part.spec.elements)} ({', '.join(part.spec.elements)})")
            if index:
                links.append(self._parts[index - 1].outputs)
            members += own.members
            links += own.links
        return Fusion(members, links)

    def stop(self) -> None:
        """Stop every member that was started (each even when another fails), then report the first failure:
        a member's earlier one (see ``_failed``), else the first raised by a ``stop()``, which is raised."""
        stop_failure: tuple[int, Exception] | None = None
        for index, part in enumerate(self._parts):
            try:
                part.stage.stop()
            except Exception as exc:
                if stop_failure is None:
                    stop_failure = (index, exc)
                    self._failure = self._failure or self._describe(index, exc, " in stop()")
        try:
            self._post_records()
        except Exception:
            pass  # the bus is closing; the records of a failed run are moot
        if self._failure is not None:
            self.context.post("error", **self._failure)
        if stop_failure is not None:
            raise stop_failure[1]

    # ---- batches ---------------------------------------------------------
    def handle(self, batch: Batch) -> Iterator[Batch]:
        self._input.count(batch)
        return self._into(0, batch)

    def produce(self) -> Iterator[Batch | None]:
        """The source member's batches, each through the members after it; an end of stream added if it
        ends without one (as the runtime adds to a source's output)."""
        part = self._parts[0]
        try:
            part.stage.idle_every = self.idle_every
            produced = part.stage.produce()
            if produced is None or not hasattr(produced, "__iter__"):
                raise ConfigError(f"{part.spec.name}: produce() returned {type(produced).__name__}, not an "
                                  "iterable of batches (yield each batch)")
            ended, last_epoch = False, 0
            for batch in produced:
                if batch is None:
                    yield None
                    continue
                _check_batch(part, batch)
                ended = bool(batch.is_control and batch.flags & Flag.END_OF_STREAM)
                last_epoch = batch.epoch
                yield from self._out(0, batch)
                if batch.is_control and batch.flags & Flag.EPOCH_END:
                    part.close_epoch(batch.epoch)
            if not ended:
                yield from self._out(0, Batch.control(Flag.END_OF_STREAM, last_epoch,
                                                      format=part.spec.output_format or "any"))
            part.finished = True
        except BaseException as exc:
            raise self._failed(0, exc)

    def tick(self) -> Iterator[Batch]:
        """Each member's timer when it is due (on its own interval), and the members' epoch records."""
        now = time.monotonic()
        for index, part in enumerate(self._parts):
            interval = part.stage.tick_interval
            if interval <= 0 or part.finished or now < part.next_tick:
                continue
            part.next_tick = now + interval
            try:
                for batch in part.stage.tick():
                    _check_batch(part, batch)
                    yield from self._out(index, batch)
            except BaseException as exc:
                raise self._failed(index, exc)
        self._update_interval()
        if now >= self._next_records:
            self._next_records = now + RECORDS_INTERVAL
            self._post_records()

    def _into(self, index: int, batch: Batch) -> Iterator[Batch]:
        """Member ``index`` handles ``batch``; what it emits goes on (the runtime's part: epoch ends, counts)."""
        part = self._parts[index]
        try:
            for out in part.stage.handle(batch):
                _check_batch(part, out)
                yield from self._out(index, out)
            if batch.is_control:
                if batch.flags & Flag.EPOCH_END:
                    part.close_epoch(batch.epoch)
                if batch.flags & Flag.END_OF_STREAM:
                    part.finished = True
        except BaseException as exc:
            raise self._failed(index, exc)

    def _out(self, index: int, batch: Batch) -> Iterator[Batch]:
        """What member ``index`` emitted: counted, stamped as the runtime would, fed to the next member."""
        part = self._parts[index]
        if part.page_counter is not None:
            batch = part.page_counter.stamp(batch)
        part.outputs.count(batch)
        if index + 1 == len(self._parts):
            yield batch
        else:
            yield from self._into(index + 1, batch)

    # ---- reporting -------------------------------------------------------
    def _failed(self, index: int, exc: BaseException) -> BaseException:
        """What to raise when member ``index`` raised ``exc``: the worker's ``Stopped``, after noting the
        failure under the member's name; ``stop()`` reports it once every member has stopped (the supervisor
        terminates every process when it hears of a failure, so hearing first would cut members' stops short).
        A stop request, an exit, or a failure already noted (raised through the members above) passes as is."""
        if not isinstance(exc, Exception) or isinstance(exc, Stopped):
            return exc
        self._failure = self._describe(index, exc)
        return Stopped()

    def _describe(self, index: int, exc: Exception, when: str = "") -> dict[str, str]:
        """An ``error`` bus message's fields for ``exc`` raised by member ``index`` (called where it is caught)."""
        return {"reason": f"{type(exc).__name__}{when}: {exc}", "traceback": traceback.format_exc(),
                "category": error_category(exc), MEMBER_FIELD: self.parts[index].name}

    def _post_records(self) -> None:
        for part in self._parts:
            records = part.context.recorder.take()
            if records:
                part.context.post("epochs", records=records)

    def _update_interval(self) -> None:
        """Tick as often as the most frequent member timer, and at least every RECORDS_INTERVAL."""
        intervals = [part.stage.tick_interval for part in self._parts if part.stage.tick_interval > 0]
        self.tick_interval = min(intervals + [RECORDS_INTERVAL])


def _check_batch(part: _Part, batch: Any) -> None:
    if not isinstance(batch, Batch):
        raise ConfigError(f"{part.spec.name}: emitted {type(batch).__name__}, not a pipeline Batch")


def _member_post(post: Callable[..., None], name: str) -> Callable[..., None]:
    """``StageContext.post`` of a member: the worker's, with the member's name for the supervisor."""
    def member_post(kind: str, **fields: Any) -> None:
        post(kind, **{**fields, MEMBER_FIELD: name})
    return member_post


def as_member(message: Message, members: dict[str, frozenset[str]]) -> Message:
    """``message`` as its co-located member posted it (``MEMBER_FIELD`` gives the member's name, which must be
    one of the node's members); other messages unchanged."""
    name = message.fields.get(MEMBER_FIELD)
    if name is None:
        return message
    fields = {key: value for key, value in message.fields.items() if key != MEMBER_FIELD}
    stage = name if name in members.get(message.stage, ()) else message.stage
    return Message(message.kind, stage, message.worker, fields)


# ---- planning ----------------------------------------------------------------
def colocate(plan: Plan, policy: str, cpus: int | None = None) -> Plan:
    """``plan`` with neighbouring nodes joined as ``policy`` says (see the module); ``cpus`` for ``auto``
    (default: the CPUs this process may use)."""
    if policy not in POLICIES:
        raise ConfigError(f"colocate={policy!r}: use one of {', '.join(POLICIES)}")
    if policy == "none":
        return plan
    nodes = plan.nodes
    links = [index for index in range(len(nodes)) if _joinable(plan, index)]  # node index -> its only child
    group = list(range(len(nodes)))             # node index -> index of its group's head

    def members(head: int) -> list[int]:
        return [index for index in range(len(nodes)) if group[index] == head]

    def join(upper: int) -> None:
        lower_head, upper_head = group[nodes[upper].downstream[0]], group[upper]
        for index, head in enumerate(group):
            if head == lower_head:
                group[index] = upper_head

    if policy == "chains":
        for upper in links:
            join(upper)
    else:
        available = cpus if cpus is not None else len(os.sched_getaffinity(0))
        processes = plan.worker_processes()
        weight = [len(node.elements) for node in nodes]
        while processes > available:
            choices = [(sum(weight[i] for i in members(group[upper]) + members(group[nodes[upper].downstream[0]])),
                        -nodes[upper].downstream[0], upper) for upper in links
                       if group[upper] != group[nodes[upper].downstream[0]]]
            if not choices:
                break
            join(min(choices)[2])
            processes -= 1
    return _rebuild(plan, group)


def _joinable(plan: Plan, index: int) -> bool:
    """Whether node ``index`` may share a process with its downstream node (see the module)."""
    node = plan.nodes[index]
    if len(node.downstream) != 1:
        return False
    child = plan.nodes[node.downstream[0]]
    return all(n.workers == 1 and not n.stage.runs_in_caller and _picklable(n.stage) for n in (node, child))


def _picklable(stage: Stage) -> bool:
    try:
        pickle.dumps(stage.property_values())
    except Exception:
        return False
    return True


def _rebuild(plan: Plan, group: list[int]) -> Plan:
    """The plan with each group of nodes (a chain, in plan order) as one node."""
    nodes = plan.nodes
    heads = sorted(set(group))                  # a head comes before everything below it: topological
    number = {head: position for position, head in enumerate(heads)}
    rebuilt = []
    for head in heads:
        chain = [index for index in range(len(nodes)) if group[index] == head]
        chain.sort(key=lambda index: _depth(plan, index))
        first, last = nodes[chain[0]], nodes[chain[-1]]
        if len(chain) == 1:
            node = Node(first.stage, first.name, first.workers, first.input_format, first.output_format,
                        elements=list(first.elements), parts=list(first.parts))
        else:
            name = SEPARATOR.join(nodes[index].name for index in chain)
            parts = [PartSpec(type(nodes[index].stage), nodes[index].stage.property_values(), nodes[index].name,
                              list(nodes[index].elements), nodes[index].output_format, nodes[index].stamps_pages)
                     for index in chain]
            node = Node(Colocated(parts=parts, name=name), name, 1, first.input_format, last.output_format,
                        elements=[element for index in chain for element in nodes[index].elements],
                        parts=[nodes[index].name for index in chain])
        node.upstream = number[group[first.upstream]] if first.upstream is not None else None
        node.downstream = [number[group[child]] for child in last.downstream]
        rebuilt.append(node)
    return Plan(rebuilt)


def _depth(plan: Plan, index: int) -> int:
    depth = 0
    while (parent := plan.nodes[index].upstream) is not None:
        depth, index = depth + 1, parent
    return depth
