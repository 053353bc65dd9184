"""A stage worker linked by ZeroMQ: the body of every process of the process executor.

Each worker rebuilds its stage from a ``WorkerSpec`` (class path + property
values), binds one PULL socket per upstream worker, connects one PUSH socket
per downstream worker, and posts bus messages to the supervisor.

The process executor's links are credited local hops (pipeline.hop: a Unix
socket per pair of workers, no ZeroMQ I/O threads). Flow control is
byte-counted credit: a sender keeps at most ``max_inflight`` bytes
unacknowledged per downstream worker and blocks (polling its hops) beyond
that; a receiver returns credit on the hop for what it has taken off it
(every ``max_inflight / 4`` bytes, or when its inputs fall quiet), counting a
ring message at its full size. Links to other hosts (``pagepipe stage``, no
credit) are ZeroMQ sockets and rely on its high-water marks instead.
Large messages on process-mode links travel through a shared-memory ring of
``max_inflight`` bytes (pipeline.shm), or, when a pass-through stage emits
views of a ring it received from, as a forward reference to that ring (no
copy; the arrays are held until the next worker releases them). Releases come
back with the credit, which a worker reads while idle too, so a slot travels
back up a chain of pass-through stages as soon as the last one drops it.

Per-batch costs are kept low on purpose: a binary batch header, small batches
made at the same moment (the outputs of one input message; a back-to-back
source's page batches and their epoch end) sent as one multipart message
(``Batch.bundle_from_frames``), every message that has arrived on a hop taken
per wake-up, plain-int zmq flags, statistics as plain counters published once
a second.

Endpoints bind or connect by default as their role says (inputs bind, outputs
connect); a leading ``@`` forces bind and ``>`` forces connect (the czmq
convention), so a pipeline spread over hosts can choose who listens.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import numpy as np
import setproctitle
import zmq

from .batch import Batch, frame_buffer
from .bus import STATS_INTERVAL, Message, json_default
from .errors import CorruptData, error_category
from .core import WorkerCore
from .hop import Closed, Connection, Listener, connect, local_path
from .registry import import_target
from .routing import Router
from .shm import (SHM_THRESHOLD, Arena, ReceiveRing, RingMaps, SendRing, forward_reference, is_forward, is_reference,
                  reforward)
from .stage import Stage, StageContext

POLL_MS = 100
IDLE_ACK_MS = 10
"""Credit is returned once a quarter of max-inflight was taken, or after inputs stay quiet this long (each
return wakes the upstream worker: a short quiet spell between epochs is not worth one)."""
DRAIN_LIMIT = 16
RING_WAIT_MS = 5
"""A sender waits for ring space while releases come at least this often (slots travel down a chain of
pass-through stages); after a quiet spell this long it sends through the socket instead."""
# plain ints: pyzmq's enum flags cost microseconds per operation on the per-batch path
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
ZERO_COPY_MIN = SHM_THRESHOLD
"""Frames this large are sent without copying. pyzmq releases a zero-copy frame through its garbage-collector
thread (an inproc message and a GIL hand-off per frame), which costs more than copying a frame of a few hundred
KiB; on credited links, bigger messages travel through the ring anyway."""
CREDIT = struct.Struct("<Q")  # bytes taken off the hop
RELEASE = struct.Struct("<QQ")  # slot offset or token, kind
# A credit message (upstream on a hop) is one frame: a CREDIT (possibly 0), then any number of RELEASEs.
RELEASE_BATCH = 8
"""Ring releases wait to leave together (with the credit) until this many are queued, or inputs fall quiet:
each message wakes the upstream worker."""
SLOT, FORWARDED = 0, 1  # kinds of release: a slot of the sender's own ring, or a batch it forwarded
STANDALONE_BATCH_ESTIMATE = 1 << 20
HOP_FLUSH_BYTES = 1 << 20
"""Messages queued on an output hop are written at the end of each round of input, or once this many bytes wait."""
BUNDLE_BYTES = 1 << 20
"""A back-to-back source's queued small batches leave once they reach this size, if no epoch end came first."""
PR_SET_PDEATHSIG = 1
ARENA_CHUNKS = 16
"""A worker's arena (``StageContext.allocate``) grows to this many times max-inflight; then private memory."""
SUPERVISOR_GONE_SIGNAL = signal.SIGUSR1
SUPERVISOR_GONE_GRACE = 1.0
"""Seconds a worker whose supervisor died gets to stop its stage before it kills itself."""
EXIT_SUPERVISOR_GONE = 3
BUS_LINGER_MS = 10000
"""The supervisor reads its bus all the time: bus messages it has not taken within this long have no reader, and
a worker's exit never waits on them longer (the data links keep waiting: their last messages must arrive)."""
_supervisor_gone = threading.Event()
"""Set by the supervisor watch (a process worker's supervisor has exited)."""


class Stopped(Exception):
    """The supervisor asked this worker to stop, or is gone."""


@dataclass
class InputSpec:
    endpoint: str
    credit_endpoint: str | None = None
    """Set on a credited link (the process executor's): then the link is a local hop (``endpoint`` an ipc://
    path) and credit goes back on the hop itself; the value is not used."""
    credit_link: int = 0
    """Index of this link among the upstream worker's outputs (not needed by hops)."""
    ring_path: str | None = None
    """The upstream worker's shared-memory ring for this link (see pipeline.shm), if any."""


@dataclass
class OutputSpec:
    endpoints: list[str]
    shard_key: str | None = None
    credited: bool = False
    ring_paths: list[str] | None = None
    """One shared-memory ring per downstream worker (credited links only)."""


@dataclass
class WorkerSpec:
    """Everything a worker needs to rebuild its stage and its links."""

    stage_target: str
    properties: dict[str, Any]
    stage_name: str
    elements: list[str] = field(default_factory=list)
    """The original elements the stage runs (several for a fused stage); statistics are posted per element."""
    worker_index: int = 0
    worker_count: int = 1
    output_format: str | None = None
    stamp_pages: bool = False
    inputs: list[InputSpec] = field(default_factory=list)
    outputs: list[OutputSpec] = field(default_factory=list)
    credit_endpoint: str | None = None
    """Not used: credit comes back on each output hop (kept for the executors that still set it)."""
    bus_endpoint: str | None = None
    max_inflight: int = 32 << 20
    supervisor_pid: int = 0
    linger_ms: int = -1
    pipeline_name: str = ""
    output_shards: int = 1
    """Workers the single downstream stage shards pages among (StageContext.output_shards)."""
    arena: tuple[str, int] | None = None
    """(run directory, plan node index) where this worker's arena files go; None: no shared output memory."""


def attach(socket: zmq.Socket, endpoint: str, bind_by_default: bool) -> None:
    """Bind or connect ``socket`` as the endpoint's prefix (``@`` bind, ``>`` connect) or its role says."""
    if endpoint[:1] in ("@", ">"):
        bind_by_default, endpoint = endpoint[0] == "@", endpoint[1:]
    (socket.bind if bind_by_default else socket.connect)(endpoint)


def _frames_cost(frames: list) -> int:
    """Bytes of a multipart message: bytes, zmq Frames and Batch.to_frames' byte-cast memoryviews all have len = size."""
    return sum(map(len, frames))


class _Input:
    """One upstream worker's link: a ZeroMQ socket (uncredited), or a local hop, credited (credit and ring
    releases go back on it)."""

    __slots__ = ("socket", "listener", "hop", "ring", "unacked", "released", "closed")

    def __init__(self, socket: zmq.Socket | None, listener: Listener | None):
        self.socket = socket
        self.listener = listener
        self.hop: Connection | None = None
        self.ring: ReceiveRing | None = None
        self.unacked = 0
        self.released: list[bytes] = []   # RELEASE records queued by ring finalizers
        self.closed = False

    @property
    def key(self) -> Any:
        """What the poller watches for this input: the socket, the hop's or the listener's descriptor."""
        if self.socket is not None:
            return self.socket
        return self.hop.fileno if self.hop is not None else cast(Listener, self.listener).fileno


class _Origin:
    """A batch as it arrived in a forward reference, to pass it on by the same reference if the stage emits it
    unchanged: same object, no field reassigned (arrays from a ring or a message are read-only), meta of plain
    values equal to what arrived."""

    __slots__ = ("batch", "reference", "frames", "_fields", "_meta")

    def __init__(self, batch: Batch, reference: Any, frames: list):
        self.batch, self.reference, self.frames = batch, frame_buffer(reference), frames
        self._fields = tuple(batch.__dict__.values())
        meta = batch.meta
        self._meta = dict(meta) if all(type(value) in _PLAIN for value in meta.values()) else None

    def unchanged(self) -> bool:
        fields = self.batch.__dict__
        return (self._meta is not None and len(fields) == len(self._fields) and self.batch.meta == self._meta
                and all(now is then for now, then in zip(fields.values(), self._fields)))


_PLAIN = (str, int, float, bool, type(None))


class Worker:
    """Run one stage worker until its stream ends, it fails, or it is told to stop."""

    core: WorkerCore
    """The stage driven by this worker; set by ``_build``."""

    def __init__(self, spec: WorkerSpec, stage: Stage | None = None,
                 stop_event: threading.Event | None = None,
                 local_post: Callable[[Message], None] | None = None):
        self.spec = spec
        self.stage = stage
        self.stop_event = stop_event
        self.local_post = local_post
        self._context = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._bus: zmq.Socket | None = None
        self._bus_lock = threading.Lock()  # a caller-side stage may post from the application's thread
        self._last_stats = time.monotonic()
        self._inflight: dict[tuple[int, int], int] = {}
        self._cpu_at_start = 0.0
        self._inputs: list[_Input] = []
        self._outputs: list[tuple[Router, list, bool]] = []   # router, a zmq socket or a hop per worker, credited
        self._hops: dict[int, tuple[int, int, Connection]] = {}   # output hop descriptor -> link, worker, hop
        self._credit_poll = select.poll()   # the output hops, for credit and releases
        self._unflushed: set[Connection] = set()   # output hops with messages queued (``_push_out`` writes them)
        self._watching_out: set[int] = set()   # output hop descriptors polled for writability too
        self._poller: Any = None   # the serve loop's (zmq.Poller or select.poll), and its POLLOUT flag
        self._poller_out = 0
        self._ended: list[Connection] = []   # output hops whose reader has gone (closed at the end)
        self._send_rings: list[list[SendRing] | None] = []
        self._ring_maps = RingMaps()
        self._forwarded: dict[int, list] = {}  # token -> frames held until the downstream worker releases them
        self._forward_tokens = 0
        self._pending: dict[tuple[int, int], list] = {}  # (output link, worker) -> small batches' frames to send
        self._pending_bytes = 0
        self._hold_data = False
        self._arena: Arena | None = None
        self._origin: _Origin | None = None   # the batch being fed, when it came as a forward reference

    # ---- bus -----------------------------------------------------------
    def post(self, kind: str, **fields: Any) -> None:
        self._post_as(self.spec.stage_name, kind, fields)

    def _post_as(self, stage: str, kind: str, fields: dict[str, Any]) -> None:
        message = Message(kind, stage, self.spec.worker_index, fields)
        if self._bus is not None:
            with self._bus_lock:
                self._bus.send_json(message.to_dict(), default=json_default)
        elif self.local_post is not None:
            self.local_post(message)

    # ---- lifecycle -----------------------------------------------------
    def run(self) -> int:
        """0 when the stream ended cleanly, 1 on failure (already reported on the bus), 2 when stopped."""
        code = 0
        try:
            if self.spec.bus_endpoint:
                self._bus = self._socket(zmq.PUSH)
                self._bus.linger = BUS_LINGER_MS if self.spec.linger_ms < 0 else min(self.spec.linger_ms, BUS_LINGER_MS)
                self._bus.connect(self.spec.bus_endpoint)
            self._check_alive()
            self._build()
            self._cpu_at_start = time.process_time()
            self.core.start()
            if self.spec.inputs:
                self._serve()
            else:
                self._produce()
            self._post_statistics()
            if self.spec.output_format is None:
                self.post("eos")
        except Stopped:
            code = 2
        except BaseException as exc:  # reported on the bus, then the process exits non-zero
            code = 1
            self.post("error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                      category=error_category(exc))
        finally:
            code = self._stop_stage(code)
            if code == 0:
                self.post("done")
            self._close(code)
        return code

    def _build(self) -> None:
        spec = self.spec
        if self.stage is None:
            self.stage = import_target(spec.stage_target)(**spec.properties)
        context = StageContext(spec.stage_name, spec.worker_index, spec.worker_count, post=self.post,
                               output_shards=spec.output_shards)
        if spec.arena is not None and spec.outputs and self.stop_event is None:  # a process of its own
            self._arena = Arena(*spec.arena, spec.worker_index, self._ring_maps, spec.max_inflight,
                                ARENA_CHUNKS * spec.max_inflight)
            context.allocate = self._allocate
        self.core = WorkerCore(self.stage, context, len(spec.inputs), spec.output_format,
                               self._emit, spec.stamp_pages, spec.elements)
        self._hold_data = not spec.inputs and self.stage.back_to_back
        standalone_hwm = max(2, spec.max_inflight // STANDALONE_BATCH_ESTIMATE)
        # every input is bound before any output connects: no worker waits for one that waits itself
        for source in spec.inputs:
            if source.credit_endpoint is not None:
                link = _Input(None, Listener(local_path(source.endpoint)))
                if source.ring_path:
                    link.ring = ReceiveRing(source.ring_path, self._releaser(link, SLOT), self._ring_maps,
                                            self._releaser(link, FORWARDED))
            else:
                socket = self._socket(zmq.PULL, hwm=standalone_hwm)
                attach(socket, source.endpoint, bind_by_default=True)
                link = _Input(socket, None)
            self._inputs.append(link)
        for index, target in enumerate(spec.outputs):
            ends: list = []
            for worker, endpoint in enumerate(target.endpoints):
                if target.credited:
                    hop = connect(local_path(endpoint), self._check_alive)
                    self._hops[hop.fileno] = (index, worker, hop)
                    self._credit_poll.register(hop.fileno, select.POLLIN)
                    ends.append(hop)
                else:
                    socket = self._socket(zmq.PUSH, hwm=standalone_hwm)
                    attach(socket, endpoint, bind_by_default=False)
                    ends.append(socket)
                self._inflight[(index, worker)] = 0
            self._outputs.append((Router(len(ends), target.shard_key), ends, target.credited))
            self._send_rings.append([SendRing(path, spec.max_inflight) for path in target.ring_paths]
                                    if target.ring_paths and target.credited else None)

    def _socket(self, kind: int, hwm: int = 1000) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.sndhwm = socket.rcvhwm = hwm
        socket.reconnect_ivl = 10
        socket.linger = self.spec.linger_ms
        self._sockets.append(socket)
        return socket

    def _stop_stage(self, code: int) -> int:
        if getattr(self, "core", None) is None:   # failed before _build
            return code
        try:
            self.core.stop()
        except BaseException as exc:
            if code == 0:
                self.post("error", reason=f"{type(exc).__name__} in stop(): {exc}", traceback=traceback.format_exc())
                return 1
        return code

    def _close(self, code: int) -> None:
        orphaned = bool(self.spec.supervisor_pid) and not _alive(self.spec.supervisor_pid)
        # what was written to a hop stays readable after it is closed here: the last messages arrive
        for link in self._inputs:
            for end in (link.listener, link.hop):
                if end is not None:
                    end.close()
        for _, _, hop in self._hops.values():
            hop.close()
        for hop in self._ended:
            hop.close()
        for socket in self._sockets:
            if orphaned or (code != 0 and socket is not self._bus):   # nobody reads what an orphan sends
                socket.linger = 0
            socket.close()
        self._context.term()

    def _check_alive(self) -> None:
        if self.stop_event is not None and self.stop_event.is_set():
            raise Stopped()
        if self.spec.supervisor_pid and not _alive(self.spec.supervisor_pid):
            raise Stopped()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= STATS_INTERVAL:
            self._last_stats = now
            self._post_statistics()
            self._check_alive()

    def _post_statistics(self) -> None:
        stats = self.core.stats
        self._collect_credit()
        stats.queue_bytes = sum(self._inflight.values())
        if self.stop_event is None:  # a process of its own
            stats.cpu_seconds = time.process_time() - self._cpu_at_start
        records = self.core.epoch_records()
        if records:
            self.post("epochs", records=records)
        for element, figures in self.core.statistics():
            self._post_as(element, "stats", figures)

    # ---- receiving -----------------------------------------------------
    def _produce(self) -> None:
        for _ in self.core.produce():
            if self.stop_event is not None and self.stop_event.is_set():
                raise Stopped()
            self.core.tick()
            self._push_out()
            self._tick()
        self._flush()
        self._push_all()

    def _serve(self) -> None:
        # select.poll costs a microsecond where zmq.Poller costs several: it serves when every input is a hop
        zmq_inputs = any(link.socket is not None for link in self._inputs)
        poller: Any = zmq.Poller() if zmq_inputs else select.poll()
        self._poller, self._poller_out = poller, int(zmq.POLLOUT) if zmq_inputs else select.POLLOUT
        registered: dict[int, Any] = {}   # input index -> the key it is registered under
        core = self.core
        for descriptor in self._hops:  # releases of forwarded batches must flow upstream while this worker idles
            poller.register(descriptor, _POLLIN | (self._poller_out if descriptor in self._watching_out else 0))
        while not core.finished:
            for index, link in enumerate(self._inputs):
                wanted = None if link.closed or core.fan_in.blocked(index) else link.key
                current = registered.get(index)
                if wanted != current:
                    if current is not None:
                        poller.unregister(current)
                        del registered[index]
                    if wanted is not None:
                        poller.register(wanted, _POLLIN)
                        registered[index] = wanted
            timeout = IDLE_ACK_MS if self._owed() else POLL_MS
            timer = core.tick_wait()
            if timer is not None:
                timeout = min(timeout, max(1, int(timer * 1000)))
            ready = {key for key, _ in poller.poll(timeout)}
            if not ready:
                self._return_slots()
                self._check_alive()
            elif not ready.isdisjoint(self._hops):
                self._collect_credit()
            for index, link in enumerate(self._inputs):
                if registered.get(index) in ready and not core.finished:
                    self._drain(index, link)
            core.tick()
            self._flush()
            self._push_out()   # what everything taken in this round made, one write per downstream worker
            self._return_slots(force=False)
            self._tick()
        self._flush()
        self._push_all()
        self._return_slots()

    def _owed(self) -> bool:
        """Whether credit, releases or a credit message wait to go upstream."""
        return any(link.unacked or link.released or (link.hop is not None and link.hop.backlog)
                   for link in self._inputs)

    def _drain(self, index: int, link: _Input) -> None:
        if link.socket is not None:
            self._drain_socket(index, link.socket)
            return
        if link.hop is None:
            link.hop = cast(Listener, link.listener).accept()   # the upstream worker has connected
            if link.hop is not None:
                link.listener = None
            return
        try:
            messages = link.hop.receive()
        except Closed:
            link.closed = True   # its worker has ended: its end of stream came first, or the supervisor judges it
            return
        for frames in messages:  # a blocked input's batches wait in the fan-in (at most one read's worth)
            self._take(index, link, frames)

    def _drain_socket(self, index: int, socket: zmq.Socket) -> None:
        core = self.core
        for _ in range(DRAIN_LIMIT):
            # Ask for events rather than catch zmq.Again: messages mostly arrive one per wake-up, and raising
            # Again each time costs more than the question.
            if not cast(int, socket.get(_EVENTS)) & _POLLIN:   # EVENTS is an int option
                break
            first = socket.recv(_NOBLOCK, copy=False)
            frames = [first]
            while frames[-1].more:  # the rest of a multipart message has arrived with its first part
                frames.append(socket.recv(0, copy=False))
            for batch in Batch.bundle_from_frames(frames):
                core.feed(index, batch)
            self._flush()
            if core.finished or core.fan_in.blocked(index):
                break

    def _take(self, index: int, link: _Input, frames: list) -> None:
        """One message from a hop: its batches to the stage, what they made on downstream, credit back."""
        core = self.core
        reference = None
        if link.ring is not None and is_reference(frames[0]):
            reference = frames[0]
            frames = link.ring.unpack(frames)
        link.unacked += _frames_cost(frames)  # ring messages count their unpacked size, as sent
        if link.unacked >= self.spec.max_inflight >> 2:
            self._ack(link)
        batches = Batch.bundle_from_frames(frames)
        if reference is not None and len(batches) == 1 and is_forward(reference):
            self._origin = _Origin(batches[0], reference, frames)
        try:
            for batch in batches:
                core.feed(index, batch)
        finally:
            self._origin = None
        self._flush()  # what this message made, one message per downstream worker
        if len(link.released) >= RELEASE_BATCH:
            self._ack(link)

    def _releaser(self, link: _Input, kind: int) -> Callable[[int], None]:
        """Ring finalizer: only queues the release (it may run inside any call); ``_ack`` sends it."""
        queue = link.released
        return lambda offset: queue.append(RELEASE.pack(offset, kind))

    def _return_slots(self, force: bool = True) -> None:
        """Send the queued ring releases and credit of each input (all, or those with a batch's worth)."""
        for link in self._inputs:
            if link.hop is not None and (force or len(link.released) >= RELEASE_BATCH):
                self._ack(link)

    def _ack(self, link: _Input) -> None:
        """Return the credit of an input and its queued ring releases, as one message (and what an earlier
        one left unsent)."""
        hop = link.hop
        if hop is None:
            return
        queue = link.released
        if link.unacked or queue:
            amount, link.unacked = link.unacked, 0
            parts = [CREDIT.pack(amount)]
            while queue:
                parts.append(queue.pop())
            hop.send([b"".join(parts)])  # never waits: what the socket does not take now leaves later
        elif hop.backlog:
            hop.flush()

    # ---- sending -------------------------------------------------------
    def _emit(self, batch: Batch) -> None:
        """Send ``batch`` on; a small one (a single frame) is queued and leaves with the others made at the
        same moment (``_flush``): after the input message that made it, or, from a source, right away, unless
        the source yields back to back (``Stage.back_to_back``): then page batches wait for the epoch's end
        (or until BUNDLE_BYTES are queued)."""
        for index, (router, ends, credited) in enumerate(self._outputs):
            rings = self._send_rings[index]
            for worker, part in ((0, batch),) if router.workers == 1 else router.route(batch):
                origin = self._origin
                if origin is not None and rings is not None and part is origin.batch and origin.unchanged():
                    self._pass_on(index, worker, ends[worker], origin)
                    continue
                frames = part.to_frames()
                if len(frames) == 1:
                    self._pending.setdefault((index, worker), []).append(frames[0])
                    self._pending_bytes += len(frames[0])
                    continue
                self._flush((index, worker))  # keep the order of the batches on this link
                if credited:  # the unpacked size: credit, not ring space, bounds what is in flight
                    self._reserve(index, worker, _frames_cost(frames))
                if rings is not None and part.nbytes >= SHM_THRESHOLD:
                    frames = self._through_ring(rings[worker], frames)
                self._send(ends[worker], frames)
        if not self.spec.inputs and (batch.is_control or not self._hold_data
                                     or self._pending_bytes >= BUNDLE_BYTES):
            self._flush()

    def _pass_on(self, link: int, worker: int, end: Any, origin: "_Origin") -> None:
        """Send on an unchanged batch that came as a forward reference: the same reference under a token of
        this worker's, its arrays held until the downstream worker releases it (no new wire form to make)."""
        self._flush((link, worker))  # keep the order of the batches on this link
        self._reserve(link, worker, _frames_cost(origin.frames))
        self._forward_tokens += 1
        self._forwarded[self._forward_tokens] = origin.frames
        self._send(end, [reforward(origin.reference, self._forward_tokens)])

    def _flush(self, only: tuple[int, int] | None = None) -> None:
        """Send the queued small batches (of one link and worker, or all), as one message per worker."""
        if not self._pending:
            return
        keys = list(self._pending) if only is None else [only] if only in self._pending else []
        for key in keys:
            frames = self._pending.pop(key)
            self._pending_bytes -= _frames_cost(frames)
            index, worker = key
            _, ends, credited = self._outputs[index]
            if credited:
                self._reserve(index, worker, _frames_cost(frames))
            self._send(ends[worker], frames)

    def _through_ring(self, ring: SendRing, frames: list) -> list:
        """A large message as a ring reference: forwarded if its arrays are views of a ring this worker maps
        (held until released), else copied into ``ring``; unchanged when neither can be done."""
        located = self._ring_maps.locate(frames)
        if located is not None:
            self._forward_tokens += 1
            self._forwarded[self._forward_tokens] = frames
            return forward_reference(frames, located, self._forward_tokens)
        if not ring.fits(frames):
            return frames
        self._collect_credit()
        packed = ring.pack(frames)
        # wait while downstream makes progress; a ring that stays full (a receiver holding old slots)
        # falls back to the socket: never a deadlock
        if packed is None:
            self._push_out()   # what downstream has yet to receive is what it would release
        while packed is None and self._credit_poll.poll(RING_WAIT_MS):
            self._collect_credit()
            self._push_out()
            packed = ring.pack(frames)
            self._tick()
        return packed or frames

    def _allocate(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """``StageContext.allocate``: arena memory, waiting while downstream releases what it holds;
        private memory when the arena stays full."""
        arena = self._arena
        assert arena is not None  # _build: only a worker with outputs has an arena
        array = arena.allocate(shape, dtype)
        if array is None:
            self._push_out()
        while array is None and self._forwarded and self._credit_poll.poll(RING_WAIT_MS):
            self._collect_credit()
            self._push_out()
            array = arena.allocate(shape, dtype)
            self._tick()
        return array if array is not None else np.empty(shape, dtype)

    def _reserve(self, link: int, worker: int, cost: int) -> None:
        key = (link, worker)
        while self._inflight[key] > 0 and self._inflight[key] + cost > self.spec.max_inflight:
            self._await_credit()
        self._inflight[key] += cost

    def _await_credit(self) -> None:
        """Wait (up to a poll interval, checking for stop) for credit or released ring slots, writing what the
        output hops have queued as they take it."""
        self._push_out()
        if self._credit_poll.poll(POLL_MS):
            self._collect_credit()
            self._push_out()
        else:
            self._check_alive()
        self._tick()

    def _collect_credit(self) -> None:
        """Take every credit message waiting on the output hops: bytes downstream workers have taken off them,
        and the ring slots and forwarded batches they let go of."""
        for descriptor, (link, worker, hop) in list(self._hops.items()):
            try:
                messages = hop.receive()
            except Closed:   # the downstream worker has ended: nothing it holds is owed any more
                self._credit_poll.unregister(descriptor)
                if self._poller is not None:
                    self._poller.unregister(descriptor)
                del self._hops[descriptor]
                self._watching_out.discard(descriptor)
                self._unflushed.discard(hop)
                self._ended.append(hop)
                self._inflight[(link, worker)] = 0
                continue
            for frames in messages:
                message = frames[0]
                if len(frames) != 1 or len(message) < CREDIT.size or (len(message) - CREDIT.size) % RELEASE.size:
                    raise CorruptData(f"credit message of {len(message)} bytes, not a credit ({CREDIT.size}) "
                                      f"and releases ({RELEASE.size} each)")
                (amount,) = CREDIT.unpack_from(message)
                key = (link, worker)
                self._inflight[key] = max(0, self._inflight[key] - amount)
                for offset, kind in RELEASE.iter_unpack(message[CREDIT.size:]):
                    self._release(link, worker, offset, kind)

    def _release(self, link: int, worker: int, offset: int, kind: int) -> None:
        """A downstream worker let go of a ring slot (SLOT) or of a batch this worker forwarded (FORWARDED)."""
        if kind == FORWARDED:
            if self._forwarded.pop(offset, None) is None:
                raise CorruptData(f"ring release of unknown forwarded batch {offset}")
            return  # the held arrays may have been the last views of an upstream slot: _return_slots sends it
        rings = self._send_rings[link] if link < len(self._send_rings) else None
        if kind != SLOT or rings is None or worker >= len(rings):
            raise CorruptData(f"ring release of kind {kind} for unknown link {link} worker {worker}")
        rings[worker].release(offset)

    def _send(self, end: Any, frames: list) -> None:
        """Send one multipart message: queued on a hop (``_push_out``), or on a ZeroMQ socket, waiting (and
        checking for stop) while it is full."""
        if isinstance(end, Connection):
            end.queue(frames)
            self._unflushed.add(end)
            if end.queued_bytes >= HOP_FLUSH_BYTES:
                self._push_out()
            return
        last = len(frames) - 1
        while True:
            try:
                end.send(frames[0], _MORE_NOBLOCK if last else _NOBLOCK, copy=len(frames[0]) < ZERO_COPY_MIN)
                break
            except zmq.Again:
                if not end.poll(POLL_MS, zmq.POLLOUT):
                    self._check_alive()
        for index in range(1, last + 1):  # once the first part is queued, ZeroMQ accepts the rest
            frame = frames[index]
            end.send(frame, _MORE_NOBLOCK if index < last else _NOBLOCK, copy=len(frame) < ZERO_COPY_MIN)

    def _push_out(self) -> None:
        """Write what the output hops have queued, as far as their sockets take it now. Never waits (a worker
        waiting on one full socket could hold up the batch another worker needs to unblock it); what is left is
        written as the socket becomes writable (polled for), and credit bounds it as it bounds what is in flight."""
        if self._unflushed:
            self._unflushed = {hop for hop in self._unflushed if not hop.flush()}
        if self._watching_out or self._unflushed:
            self._watch_writable()

    def _watch_writable(self) -> None:
        wanted = {hop.fileno for hop in self._unflushed}
        if wanted == self._watching_out:
            return
        for descriptor in wanted ^ self._watching_out:
            out = descriptor in wanted
            self._credit_poll.modify(descriptor, select.POLLIN | (select.POLLOUT if out else 0))
            if self._poller is not None:
                self._poller.modify(descriptor, _POLLIN | (self._poller_out if out else 0))
        self._watching_out = wanted

    def _push_all(self) -> None:
        """Write everything the output hops have queued (the stream has ended), waiting while a socket is full;
        its reader never waits on this worker."""
        self._push_out()
        while self._unflushed:
            if not self._credit_poll.poll(POLL_MS):
                self._check_alive()
            self._collect_credit()
            self._push_out()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent goes away."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the supervisor watch below still ends orphaned workers


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped()


def _watch_supervisor(pid: int) -> None:
    """End this worker as soon as its supervisor dies (any signal, SIGKILL included), whatever it is blocked in.

    The parent of a forkserver worker is the fork server, which outlives the supervisor while any worker
    lives (each worker holds the fork server's alive pipe and the resource tracker's), so PR_SET_PDEATHSIG
    alone leaves a worker blocked in a receive running, still bound to its port. A pidfd of the supervisor
    becomes readable the moment it exits: this thread then interrupts the main thread (Stopped, so the
    stage's stop() runs: a stopped process is resumed, a replica closed) and kills the process if that has
    not ended it within SUPERVISOR_GONE_GRACE. With the workers gone, the fork server and the resource
    tracker see their pipes close and exit.
    """
    signal.signal(SUPERVISOR_GONE_SIGNAL, _raise_stopped)
    main = threading.get_ident()          # called on the main thread
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(EXIT_SUPERVISOR_GONE)
    except (AttributeError, OSError):
        pidfd = None                      # no pidfds: poll for the supervisor instead

    def wait_and_end() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _alive(pid):
                time.sleep(0.1)
        _supervisor_gone.set()
        signal.pthread_kill(main, SUPERVISOR_GONE_SIGNAL)
        time.sleep(SUPERVISOR_GONE_GRACE)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_and_end, name="supervisor-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    if _supervisor_gone.is_set():
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
        return fields[fields.rindex(b")") + 2:fields.rindex(b")") + 3] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def process_title(spec: WorkerSpec) -> str:
    """``pagepipe: xor-delta0 worker 1/2 of NAME``: what ps, top and pkill -f see of a worker."""
    title = f"pagepipe: {spec.stage_name} worker {spec.worker_index + 1}/{spec.worker_count}"
    return f"{title} of {spec.pipeline_name}" if spec.pipeline_name else title


def run_worker_process(spec: WorkerSpec) -> None:
    """Entry point of a worker process (spawn/forkserver target)."""
    setproctitle.setproctitle(process_title(spec))
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    if spec.supervisor_pid:
        _watch_supervisor(spec.supervisor_pid)
    sys.exit(Worker(spec).run())
