"""The stage API: what every pipeline element is.

A stage declares its properties, the batch formats it consumes and produces
("caps"), how its input is split among workers (``shard_key``), and lifecycle
hooks. It never touches sockets or processes: the executors (inline and
process) drive the same stage code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np

from .batch import ANY, FORMATS, Batch, Flag
from .epoch_stats import EpochRecorder
from .errors import ConfigError
from .fusion import Fusion
from .units import parse_duration, parse_endpoint, parse_size

PROPERTY_TYPES = ("int", "float", "bool", "str", "size", "duration", "choice", "endpoint", "object")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Property:
    """A typed, documented stage property, parsed from launch strings.

    ``type`` is one of PROPERTY_TYPES: ``size`` accepts ``32MiB``, ``duration``
    accepts ``25ms`` (stored in seconds; a launch string must give the unit, the
    Python API may pass seconds), ``choice`` one of ``choices``, ``endpoint`` a
    ZeroMQ endpoint with its scheme (``tcp://host:port``; empty allowed unless
    required), ``object`` any Python value (Python API only, not from a launch
    string). ``required=True``: the pipeline refuses to start without it.
    ``internal=True`` marks a property only the runtime or fusion sets: it is
    left out of ``pagepipe inspect``.
    """

    def __init__(self, type: str, default: Any, doc: str, *, minimum: float | None = None,
                 maximum: float | None = None, choices: Iterable[str] | None = None, internal: bool = False,
                 required: bool = False, several: bool = False):
        if type not in PROPERTY_TYPES:
            raise ValueError(f"unknown property type {type!r}; use one of {', '.join(PROPERTY_TYPES)}")
        if (type == "choice") != (choices is not None):
            raise ValueError("a choice property needs choices=(...), and only a choice property takes them")
        if not isinstance(doc, str) or not doc:
            raise ValueError("a property needs a doc string (pagepipe inspect shows it)")
        self.type = type
        self.default = default
        self.doc = doc
        self.minimum = minimum
        self.maximum = maximum
        self.choices = tuple(choices) if choices is not None else None
        self.required = required
        self.internal = internal
        self.several = several
        """An ``endpoint`` property that also takes several endpoints, comma-separated (each one checked)."""
        self.bad_default: ConfigError | None = None
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name.replace("_", "-")
        self.attribute = name
        try:
            self.default = self.parse(self.default)
        except ConfigError as exc:  # raised by check_stage_class, naming the class (Python would wrap it here)
            self.bad_default = exc

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance._properties.get(self.attribute, self.default)

    def __set__(self, instance: Any, value: Any) -> None:
        instance._properties[self.attribute] = self.parse(value)

    def parse(self, value: Any) -> Any:
        """Convert a launch-string (or Python) value; raise ConfigError saying what is allowed."""
        try:
            parsed = self._convert(value)
        except ConfigError:
            raise
        except (TypeError, ValueError):
            raise ConfigError(f"property {self.name}: {value!r} is not a valid {self.type}") from None
        if self.type in ("int", "float", "size", "duration") and parsed is not None:
            if self.minimum is not None and parsed < self.minimum:
                raise ConfigError(f"property {self.name}: {value!r} is below the minimum {self.minimum}")
            if self.maximum is not None and parsed > self.maximum:
                raise ConfigError(f"property {self.name}: {value!r} is above the maximum {self.maximum}")
        return parsed

    def _convert(self, value: Any) -> Any:
        if self.type == "object" or value is None:
            return value
        if self.type == "int":
            return int(value) if not isinstance(value, str) else int(value, 0)
        if self.type == "float":
            return float(value)
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ConfigError(f"property {self.name}: {value!r} is not a bool (true/false)")
        if self.type == "size":
            return parse_size(value)
        if self.type == "duration":
            return parse_duration(value)
        if self.type == "endpoint":
            if self.several and "," in str(value):
                return ",".join(parse_endpoint(part.strip()) for part in str(value).split(","))
            return parse_endpoint(value) if value != "" else ""
        if self.type == "choice":
            choices = self.choices or ()
            if str(value) not in choices:
                raise ConfigError(f"property {self.name}: {value!r} is not one of {', '.join(choices)}")
            return str(value)
        return str(value)

    def parse_text(self, text: str) -> Any:
        """Parse a value written in a launch string: like ``parse``, but a duration needs its unit."""
        if self.type == "duration":
            try:
                parse_duration(text, require_unit=True)
            except ConfigError as exc:
                raise ConfigError(f"property {self.name}: {exc}") from None
        return self.parse(text)

    def describe_range(self) -> str:
        """Allowed values, for ``pagepipe inspect``."""
        if self.choices is not None:
            return " | ".join(self.choices)
        if self.minimum is not None or self.maximum is not None:
            low = "-inf" if self.minimum is None else self.minimum
            high = "inf" if self.maximum is None else self.maximum
            return f"{low} .. {high}"
        return ""


def private_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``StageContext.allocate`` where no shared memory is offered (inline mode, caller-side stages)."""
    return np.empty(shape, dtype)


@dataclass
class StageContext:
    """What the executor tells a stage when it starts in its worker."""

    stage_name: str
    worker_index: int = 0
    worker_count: int = 1
    post: Callable[..., None] = field(default=lambda kind, **fields: None)
    """``post("warning", message=...)`` sends a message to the bus."""
    allocate: Callable[[tuple[int, ...], Any], np.ndarray] = field(default=private_array)
    """``allocate(shape, dtype)``: an uninitialised array for output the stage writes once. In process mode
    it lies in the worker's shared memory (pipeline.shm), so a batch made of it leaves the worker by
    reference instead of being copied; it is reused once no view of it is left."""
    output_shards: int = 1
    """How many workers the next stage splits this stage's pages among by page number (``page % shards``), when
    it does. A source that groups its pages so (each batch within one shard, as an epoch's order does not
    matter) lets the runtime pass every batch on whole, by reference, instead of copying the pieces apart."""
    recorder: EpochRecorder = field(default_factory=EpochRecorder)

    def warn(self, message: str, **fields: Any) -> None:
        """A warning on the bus; ``event="discarded"`` and the like name it for logs."""
        self.post("warning", message=message, **fields)

    def event(self, name: str, message: str, **fields: Any) -> None:
        """Tell the bus something happened that a log should show as it happens (``connected``,
        ``waiting``, ``resync``, ...); ``message`` is one line for people."""
        self.post("event", event=name, message=message, **fields)

    def record_epoch(self, epoch: int, **values: float) -> None:
        """Record numbers about one epoch (``pause_seconds=``, ``dirty_pages=``, ...; see
        pipeline.epoch_stats for the names in use and how workers' values merge).

        Thread safe and cheap (a deque append); the records reach the supervisor with the next
        statistics message and end up in ``--stats-json``, the summary, reports and metrics.
        """
        self.recorder.pending.append((epoch, values))


class Stage:
    """Base class of every pipeline element.

    Subclasses set ``factory_name``, ``description``, ``input_caps`` (formats
    accepted; empty for sources) and ``output_caps`` (format produced; None for
    sinks), declare ``Property`` attributes, and implement ``process`` (or
    ``produce`` for sources).

    Reporting: ``self.counters`` (running totals, posted once a second),
    ``self.context.warn(text)``, ``self.context.event(name, text)`` (a log line as it
    happens), and ``self.context.record_epoch(epoch, pause_seconds=..., dirty_pages=...)``
    for per-epoch numbers (the runtime already records each stage's bytes and pages in
    and out per epoch); see pipeline.epoch_stats.
    A property declared with ``required=True`` must be given; the launch parser checks
    it before anything starts.

    Merging stages never changes results: the runtime may run neighbours as
    one fused stage (``fuse``), but only stages whose own class declares how
    they fuse, and the fused stage does exactly what they would do apart,
    reporting statistics under every original element's name (pipeline.fusion).
    """

    factory_name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    input_caps: ClassVar[tuple[str, ...]] = ()
    output_caps: ClassVar[str | None] = None
    shard_key: ClassVar[str | None] = None  # None: round-robin; "page": by page number
    max_workers: ClassVar[int] = 64
    runs_in_caller: ClassVar[bool] = False  # must run in the process that owns its memory
    back_to_back: ClassVar[bool] = False
    fusion: Fusion | None = None
    """Set by a fused stage: its original elements and the traffic between them (pipeline.fusion)."""
    """Sources: ``produce`` yields each epoch's batches and its end one right after another, never waiting in
    between, so the process executor may hold small page batches until the epoch's end and send them together."""

    tick_interval: float = 0.0
    """Seconds between calls of ``tick`` (0: never); a stage with a timer sets it, at the latest in ``start``."""
    idle_every: float = 0.0
    """Set by the executor on sources: a source that waits for input yields None after this long without a
    batch, so the executor can run the other stages' timers and check for stop requests (0: never)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the class against the stage contract when it is defined (see ``check_stage_class``)."""
        super().__init_subclass__(**kwargs)
        check_stage_class(cls)

    name = Property("str", "", "Element name, for references (t.) and messages")
    workers = Property("int", 1, "Worker processes running this stage side by side", minimum=1, maximum=64)

    def __init__(self, **properties: Any):
        self._properties: dict[str, Any] = {}
        self.counters: dict[str, Any] = {}
        """Stage-specific statistics (hits, misses, ...: numbers, or a short text), reported on the bus."""
        self.context = StageContext(stage_name=self.factory_name)
        known = self.properties()
        for key, value in properties.items():
            prop = known.get(key.replace("_", "-"))
            if prop is None:
                raise ConfigError(
                    f"{self.factory_name}: unknown property {key!r}; known: {', '.join(sorted(known))}")
            prop.__set__(self, value)
        if self.workers > self.max_workers:
            raise ConfigError(f"{self.factory_name}: workers={self.workers} but at most {self.max_workers} allowed")

    @classmethod
    def properties(cls) -> dict[str, Property]:
        """Every property of this stage, by launch name (``max-inflight``)."""
        found: dict[str, Property] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                if isinstance(value, Property):
                    found[value.name] = value
        return found

    def missing_properties(self) -> list[str]:
        """Launch names of the required properties not given (empty or unset)."""
        return [prop.name for prop in self.properties().values()
                if prop.required and getattr(self, prop.attribute) in (None, "")]

    def check(self) -> None:
        """Check the configuration before anything starts (the pipeline's plan calls it); ConfigError
        saying what is wrong. By default: every required property is given. Stages with rules
        across properties (one of pid=, pids=, cgroup=) extend it."""
        self.check_required()

    def check_required(self) -> None:
        """ConfigError naming the required properties not given, and an example of each."""
        missing = self.missing_properties()
        if missing:
            where = self.name or self.factory_name
            raise ConfigError(f"{where}: required propert{'y' if len(missing) == 1 else 'ies'} "
                              f"{', '.join(m + '=' for m in missing)} not given "
                              f"(pagepipe inspect {self.factory_name} describes {'it' if len(missing) == 1 else 'them'})")

    def property_values(self) -> dict[str, Any]:
        """The values set explicitly, by attribute name; enough to rebuild the stage elsewhere."""
        return dict(self._properties)

    @property
    def is_source(self) -> bool:
        return not self.input_caps

    @property
    def is_sink(self) -> bool:
        return self.output_caps is None

    def accepts(self, fmt: str) -> bool:
        return ANY in self.input_caps or fmt in self.input_caps or fmt == ANY

    def output_format(self, input_format: str | None) -> str | None:
        """The format this stage emits given what it receives (pass-through stages override)."""
        return self.output_caps

    def fuse(self, downstream: "Stage") -> "Stage | None":
        """A single stage doing exactly this stage's and ``downstream``'s work, or None.

        The executors use it to run, for example, xor-delta and rle as one
        fused kernel when they would otherwise sit side by side. The runtime
        asks only a stage whose own class defines ``fuse`` (a subclass that
        inherits it is never fused); an implementation accepts only downstream
        classes it knows exactly (``type(downstream) is X``) and gives the fused
        stage a ``Fusion`` with one member per original element
        (``Fusion.join(self, downstream)`` for a plain pair), so each element's
        statistics stay its own. See pipeline.fusion.
        """
        return None

    # ---- lifecycle, called in the worker --------------------------------
    def start(self, context: StageContext) -> None:
        """Called once in the worker before any batch."""
        self.context = context

    def produce(self) -> Iterator[Batch | None]:
        """Sources: yield batches until the stream ends (the executor adds nothing); None means "nothing yet"
        (see ``idle_every``)."""
        raise NotImplementedError(f"{self.factory_name} is not a source")

    def process(self, batch: Batch) -> Iterable[Batch]:
        """Transform one batch of pages into zero or more batches."""
        raise NotImplementedError(f"{self.factory_name} does not implement process()")

    def control(self, batch: Batch) -> Iterable[Batch]:
        """A control batch (layout, epoch end, end of stream); forwarded by default."""
        yield batch

    def flush(self, marker: Batch) -> Iterable[Batch]:
        """Emit what is held back, at each epoch end and at end of stream."""
        return ()

    def tick(self) -> Iterable[Batch]:
        """Timer hook: called about every ``tick_interval`` seconds between inputs (never during ``process``,
        in the same thread), until the stream has ended; what it yields goes downstream (heartbeats, say).

        Both executors call it: the process executor wakes a waiting worker for it; the inline executor calls
        it between source batches, which is why waiting sources yield None every ``idle_every`` seconds.
        """
        return ()

    def stop(self) -> None:
        """Called once in the worker after the last batch, also on failure."""

    # ---- what the executors call ----------------------------------------
    def handle(self, batch: Batch) -> Iterator[Batch]:
        """Route one incoming batch to process(), or to flush() + control()."""
        if batch.is_control:
            if batch.flags & (Flag.EPOCH_END | Flag.END_OF_STREAM):
                yield from self.flush(batch)
            yield from self.control(batch)
        else:
            out = self.process(batch)
            if out is None or isinstance(out, (Batch, str, bytes)) or not hasattr(out, "__iter__"):
                raise ConfigError(f"{self.factory_name or type(self).__qualname__}: process() returned "
                                  f"{type(out).__name__}, not an iterable of batches (yield each batch out, or "
                                  "return a list; () for none)")
            yield from out

    def __repr__(self) -> str:
        props = " ".join(f"{k.replace('_', '-')}={v!r}" for k, v in self._properties.items())
        return f"<{self.factory_name} {props}>".replace(" >", ">")


FACTORY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_+-]*$")
"""What a factory name may look like (a word of a launch string)."""


def check_stage_class(cls: type[Stage]) -> None:
    """ConfigError naming the class unless its class attributes follow the stage contract.

    ``factory_name`` a launch word (or empty for a base class that is never registered), ``input_caps`` a
    tuple of formats (``(PAGES,)``, not ``PAGES``), ``output_caps`` a format or None, ``shard_key`` None or
    "page", ``max_workers`` a positive int, flags real bools.
    """
    where = f"stage class {cls.__module__}.{cls.__qualname__}"

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    if not isinstance(cls.factory_name, str) or (cls.factory_name and not FACTORY_NAME.match(cls.factory_name)):
        raise fail(f"factory_name {cls.factory_name!r} is not a word such as 'my-classify'")
    if not isinstance(cls.description, str):
        raise fail("description must be a str")
    caps = cls.input_caps
    if not isinstance(caps, tuple) or not all(isinstance(fmt, str) and fmt in FORMATS for fmt in caps):
        hint = f" (write ({caps!r},))" if isinstance(caps, str) else ""
        raise fail(f"input_caps must be a tuple of formats from pipeline.batch ({', '.join(FORMATS)}), "
                   f"got {caps!r}{hint}")
    if cls.output_caps is not None and cls.output_caps not in FORMATS:
        raise fail(f"output_caps must be one format from pipeline.batch ({', '.join(FORMATS)}) or None (a sink), "
                   f"got {cls.output_caps!r}")
    if cls.shard_key not in (None, "page"):
        raise fail(f"shard_key must be None or 'page', got {cls.shard_key!r}")
    if type(cls.max_workers) is not int or cls.max_workers < 1:
        raise fail(f"max_workers must be a positive int, got {cls.max_workers!r}")
    for flag in ("runs_in_caller", "back_to_back"):
        if not isinstance(getattr(cls, flag), bool):
            raise fail(f"{flag} must be True or False, got {getattr(cls, flag)!r}")
    for attribute, value in vars(cls).items():
        if value is Property:
            raise fail(f"{attribute} = Property: call it, Property(type, default, doc)")
        if isinstance(value, Property) and value.bad_default is not None:
            raise fail(f"default of {value.bad_default}")
