"""process-src: checkpoints of other live processes (one, a process tree, a list or a cgroup).

Each checkpoint stops every process of the set together (ptrace: seize and
interrupt every thread; see freezer.py for why this can never leave them
frozen), re-reads their writable mappings (following those that appear, grow,
shrink or vanish, and processes that start and exit), finds the pages that
changed, and resumes them; compression and sending happen while they run.
Shared memory is tracked once per object (proclayout.py). How changed pages
are found is its own part (``self.tracking``), chosen by ``mode=``: ``uffd``
asks the kernel which pages were written (a userfaultfd injected into each
process, uffd_tracking.py): the first checkpoint sends every page, every
later one reads only the written pages, so the pause follows the dirty pages,
not the size; a checkpoint that sends everything (the first, a resync) is
copied while the processes run, after a short stop that arms the tracking,
and its pause reads only what was written during that copy. Mappings the
kernel cannot track for us (shared, file-backed, ranges the process watches
with its own userfaultfd) are digested and named in a warning. ``digest`` reads every page that may hold data and compares
digests (digest_tracking.py), where ``copy=`` chooses what the pause does.
``auto`` (default) is uffd where the kernel and permissions allow, else
digest with a warning saying why.

Timing: ``interval`` is the time from the start of one checkpoint to the start
of the next; ``min-run`` is the least time the processes run between two
pauses, so a checkpoint slower than the interval delays the next one instead
of keeping the processes stopped. ``stopped_fraction`` (statistics) is the
share of the time since the first checkpoint began that they were stopped.
The processes are resumed on every path, errors included, except after the
final checkpoint with ``stop-at-end=true``.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.batch import PAGES, Batch
from pipeline.errors import ConfigError, TrackerError, TransportError
from pipeline.stage import Property, Stage, StageContext
from stages.common.acks import AckListener
from stages.common.layout import Mapping
from stages.common.security import CurveProperties
from stages.common.wire import new_stream_id

from .digest_tracking import DigestTracking
from .uffd_tracking import UffdTracking
from .epochs import EpochRecords, EpochStream
from .freezer import AlreadyTraced, PtraceFreezer, SignalFreezer, open_freezer
from .procmem import ProcessGone, past_end_of_file, read_pages, writable_mappings
from .proclayout import ProcessLayout, Tracked
from .targets import TargetSet, outside_sharers, shared_objects

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAUSE_WINDOW = 1000
"""Steady checkpoints whose pauses the median and p99 statistics cover."""
SHARERS_RECHECK = 10.0
"""Seconds between two looks through /proc for processes outside the set that map its shared memory."""


@dataclass
class _Snapshot:
    """One checkpoint: the layout (and whether it changed), the changed pages, and when the pause was."""

    tracked: list[Tracked]
    vanished: list[tuple[int, int]]
    layout_changed: bool
    members: list[int]
    pause: float = 0.0
    when: float = 0.0


def _pid_list(text: str) -> list[int]:
    try:
        pids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"pids={text!r}: expected process ids separated by commas (pids=12,34)") from None
    if any(pid < 1 for pid in pids):
        raise ConfigError(f"pids={text!r}: process ids are positive")
    return pids


class ProcessSource(CurveProperties, Stage):
    """Checkpoints of other processes, stopped together for each (ptrace), pages found by digest."""

    factory_name = "process-src"
    description = "Dirty pages of other live processes (stop together, read, resume every interval)"
    output_caps = PAGES

    pid = Property("int", None, "Process to checkpoint", minimum=1)
    pids = Property("str", "", "Processes to checkpoint together, separated by commas (instead of pid=)")
    tree = Property("bool", False, "Also every descendant of pid=/pids=, followed as they start and exit")
    cgroup = Property("str", "", "Checkpoint every process of this cgroup (a path, absolute or under "
                      "/sys/fs/cgroup), followed as they join and leave (instead of pid=)")
    interval = Property("duration", "25ms", "Time from the start of one checkpoint to the start of the next "
                        "(start to start; the next one also waits until the processes ran min-run)",
                        minimum=0)
    min_run = Property("duration", None, "Least time the processes run between the end of one pause and the "
                       "start of the next, whatever a checkpoint takes (default: half the interval); the "
                       "statistics' stopped_fraction is the share of time they were stopped", minimum=0)
    checkpoints = Property("int", 0, "Checkpoints to take, then end (0: until the processes exit or close())",
                           minimum=0)
    stop_at_end = Property("bool", False, "Leave the processes stopped after the final checkpoint")
    batch_pages = Property("int", 256, "Pages per emitted batch", minimum=1, maximum=1 << 16)
    stop_timeout = Property("duration", "2s", "How long to wait for the processes to stop", minimum=0)
    mode = Property("choice", "auto", "How changed pages are found: uffd: the kernel lists the written pages "
                    "(userfaultfd injected with ptrace; shared and file-backed mappings digested) | digest: read "
                    "and compare every page | auto: uffd where possible, else digest with a warning",
                    choices=("auto", "uffd", "digest"))
    copy = Property("choice", "all", "(pages found by digest) all: the pause copies every resident page, changes "
                    "are found after the processes resume (shortest pause; memory as large as theirs) | changed: the pause "
                    "digests chunk by chunk and copies only changed pages (4 MiB of memory)",
                    choices=("all", "changed"))
    ack_endpoint = Property("endpoint", "", "Bind an ack listener here (e.g. tcp://primary:5556) for the receiver's "
                            "replica-sink ack-endpoint=: its resync requests reach this tracker ('' = none); on "
                            "tcp give secret-key= and authorized-keys= (the receivers' public keys)")

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self.targets: TargetSet | None = None
        self.freezer: PtraceFreezer | SignalFreezer | None = None
        self.tracking: DigestTracking | UffdTracking | None = None
        self._layout = ProcessLayout(PAGE_SIZE)
        self._tracked: list[Tracked] = []
        self._mappings: dict[int, list[Mapping]] = {}
        self._members: list[int] = []
        self._resync_requested = False
        self._close_requested = threading.Event()
        self._ack_listener: AckListener | None = None
        self._sharers_checked: tuple = ((), 0.0)
        self._sharers_warned: set[tuple[int, str]] = set()
        self._stopped_seconds = 0.0
        self._records = EpochRecords(PAGE_SIZE)
        self._steady_pauses: collections.deque[float] = collections.deque(maxlen=PAUSE_WINDOW)
        self.stream_id = new_stream_id().hex()
        """This tracker's stream identity: frame writes it into the wire, acknowledgements must name it."""

    @property
    def _where(self) -> str:
        return self.name or self.factory_name

    @property
    def _set(self) -> TargetSet:
        if self.targets is None:
            raise TrackerError(f"{self._where}: not started")
        return self.targets

    @property
    def _freezer(self) -> PtraceFreezer | SignalFreezer:
        if self.freezer is None:
            raise TrackerError(f"{self._where}: not started (or stopped)")
        return self.freezer

    @property
    def _tracking(self) -> DigestTracking | UffdTracking:
        if self.tracking is None:
            raise TrackerError(f"{self._where}: not started (or stopped)")
        return self.tracking

    @property
    def min_run_seconds(self) -> float:
        return self.interval / 2 if self.min_run is None else self.min_run

    def check(self) -> None:
        """Before anything starts: exactly one of pid=, pids=, cgroup= (ConfigError)."""
        super().check()
        given = [bool(self.pid), bool(self.pids), bool(self.cgroup)]
        if sum(given) != 1:
            raise ConfigError(f"{self._where}: give exactly one of pid=, pids= and cgroup=")
        if self.tree and self.cgroup:
            raise ConfigError(f"{self._where}: tree=true goes with pid= or pids=, not cgroup=")
        if self.pids:
            _pid_list(self.pids)

    def _target_set(self) -> TargetSet:
        self.check()
        roots = [self.pid] if self.pid else _pid_list(self.pids)
        return TargetSet(roots if not self.cgroup else (), self.tree, self.cgroup)

    def start(self, context: StageContext) -> None:
        """Check that the processes exist and their memory can be read; TrackerError saying why not."""
        super().start(context)
        targets = self.targets = self._target_set()
        try:
            members = targets.members()
            if not members:
                missing = "no process in" if self.cgroup else "no process with"
                raise TrackerError(f"{missing} {targets.describe()}")
            readable = 0
            for pid in members:
                try:
                    readable += self._check_readable(pid)
                except ProcessGone:
                    continue  # exited meanwhile: the set follows such changes
            if not readable:
                raise TrackerError(f"{targets.describe()}: no writable memory to track (a kernel thread?)")
            self.freezer = open_freezer(members, self.stop_timeout, context.warn)
        except ProcessGone as gone:
            raise TrackerError(f"{self._where}: pid {gone} exited before tracking began") from None
        except TrackerError as exc:
            raise TrackerError(f"{self._where}: {exc}") from None
        if self.mode == "digest":
            self.tracking = DigestTracking(PAGE_SIZE, self.copy, self._read_pages, context.warn)
        else:
            self.tracking = UffdTracking(PAGE_SIZE, self.copy, self._read_pages,
                                         lambda message: context.warn(f"{self._where}: {message}"),
                                         tracer=lambda: getattr(self.freezer, "tracer", None),
                                         stops=self._thread_stops, strict=self.mode == "uffd")
        if self.ack_endpoint:
            try:
                self._ack_listener = AckListener(
                    self.ack_endpoint, secret_key=self.secret_key, authorized_keys=self.authorized_keys,
                    server_key=self.server_key, insecure=self.insecure,
                    max_connections=self.max_connections).attach(self)
            except TransportError as exc:
                self.stop()
                raise TransportError(f"{self._where}: {exc}") from None

    def _thread_stops(self, pid: int) -> dict:
        """How each thread of a stopped process is stopped (ptrace only; empty when stopped by signal)."""
        return self.freezer.stops(pid) if isinstance(self.freezer, PtraceFreezer) else {}

    def _check_readable(self, pid: int) -> bool:
        """Whether the process has writable memory (one exiting has none); TrackerError if it cannot be read."""
        mappings = writable_mappings(pid)
        if mappings:
            read_pages(pid, [(mappings[0].start, 1, 0)], PAGE_SIZE, np.zeros((1, PAGE_SIZE), dtype=np.uint8))
        return bool(mappings)

    def stop(self) -> None:
        if self.tracking is not None:
            self.tracking.close()
            self.tracking = None
        if self.freezer is not None:
            self.freezer.close()
            self.freezer = None
        if self._ack_listener is not None:
            self._ack_listener.close()
            self._ack_listener = None

    def request_resync(self) -> None:
        """The next checkpoint carries the layout and every tracked page, flagged RESYNC."""
        self._resync_requested = True
        self.context.event("resync", f"{self._where}: a resync was asked for: the next checkpoint carries every page")

    def acknowledged(self, epoch: int) -> None:
        """The receiver committed ``epoch`` (ack listener thread): records its checkpoint -> ack latency."""
        self._records.acknowledged(self.context, epoch)

    def close(self) -> None:
        """Take one final checkpoint now and end the stream (thread safe)."""
        self._close_requested.set()

    # ---- the schedule ---------------------------------------------------------------
    def produce(self) -> Iterator[Batch]:
        stream = EpochStream(PAGE_SIZE, self.batch_pages, tracking=self._tracking.name, pids=self._members,
                             stream_id=self.stream_id, **({"pid": self.pid} if self.pid else {}))
        epoch = 0
        first_start = next_start = time.monotonic()
        while True:
            final = self._close_requested.is_set() or (self.checkpoints and epoch + 1 == self.checkpoints)
            resync = self._resync_requested
            self._resync_requested = False
            started = time.monotonic()
            try:
                if resync or epoch == 0:
                    self._copy_live(epoch + 1)
                snapshot = self._checkpoint(epoch + 1, bool(final), everything=resync or epoch == 0)
            except ProcessGone:
                yield stream.end_of_stream(epoch)
                return
            resumed = time.monotonic()
            self.counters.update(self._tracking.counters)
            epoch += 1
            numbers, data = self._tracking.resumed()
            self.counters["checkpoint_pages"] = len(numbers)
            if snapshot.layout_changed:
                stream.layout_extra["pids"] = snapshot.members
                yield stream.layout(epoch, [t.region for t in snapshot.tracked], snapshot.vanished)
            if len(numbers):
                yield from stream.pages(epoch, numbers, data, resync)
            yield stream.end(epoch, snapshot.pause, snapshot.when, resync)
            self._records.checkpoint(self.context, epoch, started, snapshot.pause, len(numbers), snapshot.when, resync)
            self._post_statistics(epoch, snapshot.pause, time.monotonic() - first_start,
                                  steady=not (resync or epoch == 1))
            if final:
                yield stream.end_of_stream(epoch)
                return
            self._warn_about_outside_sharers(snapshot)
            next_start = max(started + self.interval, resumed + self.min_run_seconds)
            self._close_requested.wait(max(0.0, next_start - time.monotonic()))

    def _post_statistics(self, epoch: int, pause: float, elapsed: float, steady: bool) -> None:
        """Counters of the pauses: the last, the longest, median and p99 of the last PAUSE_WINDOW steady ones
        (the first, full checkpoint and resyncs apart), and the time stopped."""
        self._stopped_seconds += pause
        if steady:
            self._steady_pauses.append(pause * 1e3)
            median, p99 = np.percentile(self._steady_pauses, [50, 99])
            self.counters.update(pause_ms_median=float(median), pause_ms_p99=float(p99))
        if self._ack_listener is not None:
            self.counters["acknowledged_epoch"] = self._ack_listener.acked_epoch
            for text in self._ack_listener.take_warnings():   # refused peers, posted from this thread
                self.context.warn(f"{self._where}: {text}")
        self.counters.update(checkpoints=epoch, pause_ms=pause * 1e3,
                             pause_ms_max=max(pause * 1e3, self.counters.get("pause_ms_max", 0.0)),
                             stopped_seconds=self._stopped_seconds,
                             stopped_fraction=self._stopped_seconds / elapsed if elapsed > 0 else 1.0,
                             processes=len(self._members),
                             stopped_by_ptrace=int(isinstance(self.freezer, PtraceFreezer)))

    # ---- one checkpoint -------------------------------------------------------------
    def _checkpoint(self, epoch: int, final: bool, everything: bool) -> _Snapshot:
        """Stop, read, resume. ProcessGone if every process exited before it could be stopped."""
        began = time.perf_counter()
        when = time.time()
        keep_stopped = False
        try:
            members = self._freeze()
            try:
                snapshot = self._paused(members, everything)
            except ProcessGone as gone:
                raise TrackerError(f"pid {gone} died during the checkpoint") from None
            keep_stopped = final and self.stop_at_end
        except TrackerError as exc:
            resumed = "resumed" if self.freezer is not None else "not stopped"
            raise TrackerError(f"{self._where}: checkpoint of epoch {epoch} failed: {exc} "
                               f"({self._set.describe()} {resumed})") from None
        finally:
            self._freezer.thaw(keep_stopped)
        snapshot.pause = time.perf_counter() - began
        snapshot.when = when
        return snapshot

    def _copy_live(self, epoch: int) -> None:
        """mode=uffd, before a checkpoint that sends everything: a short stop arms the processes' private memory
        (injecting where needed), which is then copied while they run, so the checkpoint's pause re-reads only
        the pages written meanwhile (uffd_tracking.py). ProcessGone if every process exited."""
        tracking = self._tracking
        if not isinstance(tracking, UffdTracking):
            return
        tracking.ready()
        began = time.perf_counter()
        try:
            mappings = {}
            for pid in self._freeze():
                try:
                    mappings[pid] = writable_mappings(pid)
                except ProcessGone:
                    continue
            tracking.arm(mappings)
        except TrackerError as exc:
            raise TrackerError(f"{self._where}: arming epoch {epoch} for its live copy failed: {exc} "
                               f"({self._set.describe()} resumed)") from None
        finally:
            self._freezer.thaw()
        pause = time.perf_counter() - began
        self._stopped_seconds += pause
        self.counters["arming_pause_ms"] = pause * 1e3
        tracking.copy_live()

    def _freeze(self) -> list[int]:
        """Stop every process of the set; a process someone else started tracing switches to SIGSTOP."""
        try:
            return self._freezer.freeze(self._set.members)
        except AlreadyTraced as exc:
            self.context.warn(f"{self._where}: {exc}: stopping with SIGSTOP/SIGCONT from now on, a guardian "
                              f"process resumes the processes if pagepipe dies while they are stopped")
            self._freezer.close()
            self.freezer = SignalFreezer(self.stop_timeout)
            return self._freezer.freeze(self._set.members)

    def _paused(self, members: list[int], everything: bool) -> _Snapshot:
        """With every process stopped: follow the processes and their mappings, read what may have changed."""
        mappings = {}
        for pid in members:
            try:
                mappings[pid] = writable_mappings(pid)
            except ProcessGone:
                continue  # exited as it was being stopped: its regions leave the layout
        if not mappings:
            raise ProcessGone(members[0])
        for pid in set(self._mappings) - set(mappings):
            self._tracking.forget_process(pid)
        self._mappings = mappings
        self._members = sorted(mappings)
        tracked, vanished = self._layout.update(mappings)
        snapshot = _Snapshot(tracked, vanished, everything or tracked != self._tracked or bool(vanished),
                             self._members)
        self._tracked = tracked
        self._tracking.counters["past_eof_pages"] = 0
        self._tracking.forget(vanished)
        self._tracking.paused(tracked, self._layout.next_page, everything)
        return snapshot

    def _read_pages(self, pid: int, runs: list[tuple[int, int, int]], out: np.ndarray) -> None:
        """Read runs of one process; a page the kernel refuses is zeros only past the end of a mapped file,
        any other is an error, never shipped as zeros."""
        refused = read_pages(pid, runs, PAGE_SIZE, out)
        mappings = self._mappings.get(pid, [])
        for address in refused:
            mapping = next((m for m in mappings if m.start <= address < m.end), None)
            if mapping is None or not past_end_of_file(pid, mapping, address, PAGE_SIZE):
                where = mapping.name if mapping is not None else "no mapping"
                raise TrackerError(f"pid {pid}: the page at {address:#x} ({where}) cannot be read; "
                                   f"not sending it as zeros")
        if refused:
            counters = self._tracking.counters
            counters["past_eof_pages"] = counters.get("past_eof_pages", 0) + len(refused)

    def _warn_about_outside_sharers(self, snapshot: _Snapshot) -> None:
        """Name the processes outside the set that map its writable shared memory (once each). All of /proc is
        read for this, with the processes running: again when their shared objects change, and at most every
        SHARERS_RECHECK seconds otherwise (processes outside that map the memory later)."""
        objects = set().union(*(shared_objects(m) for m in self._mappings.values())) if self._mappings else set()
        key = tuple(sorted(objects))
        checked, when = self._sharers_checked
        if key == checked and time.monotonic() - when < SHARERS_RECHECK:
            return
        self._sharers_checked = (key, time.monotonic())
        for pid, names in sorted(outside_sharers(self._members, objects).items()):
            for name in sorted(names):
                if (pid, name) not in self._sharers_warned:
                    self._sharers_warned.add((pid, name))
                    self.context.warn(f"{self._where}: pid {pid} is not checkpointed but maps {name} shared and "
                                      f"writable with {self._set.describe()}: its writes reach the replica "
                                      f"at whatever moment a copy reads them (add it with pids=, tree= or cgroup=)")

