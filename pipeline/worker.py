"""A stage worker linked by ZeroMQ: the body of every process of the process executor.

Each worker rebuilds its stage from a ``WorkerSpec`` (class path + property
values), binds one PULL socket per upstream worker, connects one PUSH socket
per downstream worker, and posts bus messages to the supervisor.

Flow control is byte-counted credit: a sender keeps at most ``max_inflight``
bytes unacknowledged per downstream worker and blocks (polling its credit
socket) beyond that; a receiver returns credit for what it has taken off the
socket (every ``max_inflight / 4`` bytes, or when its inputs fall quiet),
counting a ring message at its full size. Links without a credit endpoint
(``pagepipe stage`` over tcp) rely on ZeroMQ's high-water marks instead.
Large messages on process-mode links travel through a shared-memory ring of
``max_inflight`` bytes (pipeline.shm), or, when a pass-through stage emits
views of a ring it received from, as a forward reference to that ring (no
copy; the arrays are held until the next worker releases them); a batch the
stage emits unchanged leaves by the very reference it came in. Releases come
back on the credit socket, which a worker reads while idle too, so a slot
travels back up a chain of pass-through stages as soon as the last one drops it.

Per-batch costs are kept low on purpose: a binary batch header, one-frame
batches and ring references made at the same moment (what one round of input
made on the process executor's links, one input message's outputs on others; a
back-to-back source's page batches and their epoch end) sent as one multipart
message per downstream worker, as a ZeroMQ message costs tens of microseconds
of CPU on either side, receiving while the socket reports input (no zmq.Again
raised per wake-up), plain-int zmq flags, statistics as plain counters
published once a second.

Endpoints bind or connect by default as their role says (inputs bind, outputs
connect); a leading ``@`` forces bind and ``>`` forces connect (the czmq
convention), so a pipeline spread over hosts can choose who listens.
"""
from __future__ import annotations

import ctypes
import math
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
from zmq.utils.monitor import recv_monitor_message

from .batch import Batch, frame_buffer
from .bus import STATS_INTERVAL, Message, json_default
from .errors import CorruptData, error_category
from .core import WorkerCore
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
ZERO_COPY_MIN = 256 << 10
"""Frames this large are sent without copying. pyzmq releases a zero-copy frame through its garbage-collector
thread (an inproc message and a GIL hand-off per frame), which costs more than copying a frame of a few hundred
KiB; on credited links, bigger messages travel through the ring anyway."""
CREDIT = struct.Struct("<IIQ")  # output link index, downstream worker index, bytes
RELEASE = struct.Struct("<IIQQ")  # output link index, downstream worker index, slot offset or token, kind
# A credit message is a CREDIT, a CREDIT followed by RELEASEs, or RELEASEs only (told apart by length mod 24).
RELEASE_BATCH = 8
"""Ring releases wait to leave together (with the credit) until this many are queued, or inputs fall quiet:
each message wakes the upstream worker."""
SLOT, FORWARDED = 0, 1  # kinds of release: a slot of the sender's own ring, or a batch it forwarded
STANDALONE_BATCH_ESTIMATE = 1 << 20
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
DOWNSTREAM_CLOSE_WAIT = 10.0
"""Seconds a finished worker waits for its downstream workers to close their ends (``_await_downstream_closing``)."""
_supervisor_gone = threading.Event()
"""Set by the supervisor watch (a process worker's supervisor has exited)."""


class Stopped(Exception):
    """The supervisor asked this worker to stop, or is gone."""


@dataclass
class InputSpec:
    endpoint: str
    credit_endpoint: str | None = None
    credit_link: int = 0
    """Index of this link among the upstream worker's outputs."""
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


def await_disconnect(monitor: zmq.Socket, deadline: float) -> bool:
    """Wait until ``monitor`` (a socket monitor watching EVENT_DISCONNECTED) reports that the peer closed its
    connection; False when ``deadline`` (time.monotonic) passes first.

    ZeroMQ's linger covers only messages still queued in a socket: bytes its I/O thread has taken but not yet
    written are dropped when the socket closes (libzmq issue 4660). A peer that closes only once it has the
    end of the stream confirms, by closing, that everything before it arrived.
    """
    while True:
        left_ms = math.ceil((deadline - time.monotonic()) * 1000)
        if left_ms <= 0 or not monitor.poll(left_ms):
            return False
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True


def _frames_cost(frames: list) -> int:
    """Bytes of a multipart message: bytes, zmq Frames and Batch.to_frames' byte-cast memoryviews all have len = size."""
    return sum(map(len, frames))


class _Origin:
    """A batch as it arrived in a forward reference, to pass it on by the same reference if the stage emits it
    unchanged: same object, no field reassigned (arrays from a ring or a message are read-only), meta of plain
    values equal to what arrived."""

    __slots__ = ("batch", "reference", "frames", "_fields", "_meta")

    def __init__(self, batch: Batch, reference: memoryview, frames: list):
        self.batch, self.reference, self.frames = batch, reference, frames
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
        self._unacked: list[int] = [0] * len(spec.inputs)
        self._cpu_at_start = 0.0
        self._inputs: list[tuple[zmq.Socket, zmq.Socket | None, int]] = []
        self._outputs: list[tuple[Router, list[zmq.Socket], bool]] = []
        self._credit: zmq.Socket | None = None
        self._receive_rings: list[ReceiveRing | None] = []
        self._send_rings: list[list[SendRing] | None] = []
        self._released: list[list[bytes]] = [[] for _ in spec.inputs]  # RELEASE messages per input, from finalizers
        self._ring_maps = RingMaps()
        self._forwarded: dict[int, list] = {}  # token -> frames held until the downstream worker releases them
        self._forward_tokens = 0
        self._pending: dict[tuple[int, int], list] = {}  # (output link, worker) -> small batches' frames to send
        self._pending_bytes = 0
        self._pending_cost: dict[tuple[int, int], int] = {}   # credit the queued frames still need, per key
        self._pending_weight: dict[tuple[int, int], int] = {}   # credit of everything queued, per key
        self._hold_data = False
        self._bundle_rounds = False
        self._arena: Arena | None = None
        self._output_monitors: list[tuple[zmq.Socket, zmq.Socket]] = []  # (output socket, its disconnect monitor)
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
        for source in spec.inputs:
            socket = self._socket(zmq.PULL, hwm=0 if source.credit_endpoint else standalone_hwm)
            attach(socket, source.endpoint, bind_by_default=True)
            credit = None
            if source.credit_endpoint:
                credit = self._socket(zmq.PUSH, hwm=0)
                credit.linger = 0  # credit for an upstream worker that has finished is moot
                attach(credit, source.credit_endpoint, bind_by_default=False)
            self._inputs.append((socket, credit, source.credit_link))
            index = len(self._receive_rings)
            self._receive_rings.append(ReceiveRing(source.ring_path, self._releaser(index, SLOT), self._ring_maps,
                                                   self._releaser(index, FORWARDED))
                                       if source.ring_path and credit is not None else None)
        for index, target in enumerate(spec.outputs):
            sockets = []
            for endpoint in target.endpoints:
                socket = self._socket(zmq.PUSH, hwm=0 if target.credited else standalone_hwm)
                attach(socket, endpoint, bind_by_default=False)
                sockets.append(socket)
                self._output_monitors.append((socket, socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)))
            self._outputs.append((Router(len(sockets), target.shard_key), sockets, target.credited))
            self._send_rings.append([SendRing(path, spec.max_inflight) for path in target.ring_paths]
                                    if target.ring_paths and target.credited else None)
            for worker in range(len(sockets)):
                self._inflight[(index, worker)] = 0
        # what one round of input makes leaves together on the process executor's links; a link to another
        # host (``pagepipe stage``) keeps one message per input message
        self._bundle_rounds = all(credited for _, _, credited in self._outputs)
        if spec.credit_endpoint:
            self._credit = self._socket(zmq.PULL, hwm=0)
            attach(self._credit, spec.credit_endpoint, bind_by_default=True)

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
        if code == 0 and not orphaned:
            self._await_downstream_closing()
        for socket, monitor in self._output_monitors:
            socket.disable_monitor()
            monitor.close(linger=0)
        for socket in self._sockets:
            if orphaned or (code != 0 and socket is not self._bus):   # nobody reads what an orphan sends
                socket.linger = 0
            socket.close()
        self._context.term()

    def _await_downstream_closing(self) -> None:
        """After a clean end, wait (up to DOWNSTREAM_CLOSE_WAIT) until each downstream worker has closed its
        end of the link, which it does once it has taken the end of the stream.

        Without this a worker's last message (the end of the stream) could vanish as its process exits
        (``await_disconnect``), seen between ``pagepipe stage`` processes over ipc://, and the downstream stage
        would wait for it forever.
        """
        deadline = time.monotonic() + DOWNSTREAM_CLOSE_WAIT
        for _, monitor in self._output_monitors:
            if not await_disconnect(monitor, deadline):
                return

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
            self._tick()
        self._flush()

    def _serve(self) -> None:
        poller = zmq.Poller()
        registered: set[int] = set()
        core = self.core
        if self._credit is not None:  # releases of forwarded batches must flow upstream while this worker idles
            poller.register(self._credit, zmq.POLLIN)
        while not core.finished:
            for index, (socket, _, _) in enumerate(self._inputs):
                wanted = not core.fan_in.blocked(index)
                if wanted and index not in registered:
                    poller.register(socket, zmq.POLLIN)
                    registered.add(index)
                elif not wanted and index in registered:
                    poller.unregister(socket)
                    registered.discard(index)
            timeout = IDLE_ACK_MS if any(self._unacked) or any(self._released) else POLL_MS
            timer = core.tick_wait()
            if timer is not None:
                timeout = min(timeout, max(1, int(timer * 1000)))
            ready = dict(poller.poll(timeout))
            if not ready:
                self._ack_all()
                self._check_alive()
            if self._credit in ready:
                self._collect_credit()
            for index, (socket, _, _) in enumerate(self._inputs):
                if socket in ready and not core.finished:
                    self._drain(index, socket)
            core.tick()
            self._flush()
            self._return_slots()
            self._tick()
        self._flush()
        self._ack_all()

    def _drain(self, index: int, socket: zmq.Socket) -> None:
        core = self.core
        threshold = self.spec.max_inflight // 4
        ring = self._receive_rings[index]
        for _ in range(DRAIN_LIMIT):
            # Ask for events rather than catch zmq.Again: messages mostly arrive one per wake-up, and raising
            # Again each time costs more than the question.
            if not cast(int, socket.get(_EVENTS)) & _POLLIN:   # EVENTS is an int option
                break
            first = socket.recv(_NOBLOCK, copy=False)
            frames = [first]
            while frames[-1].more:  # the rest of a multipart message has arrived with its first part
                frames.append(socket.recv(0, copy=False))
            if ring is None:
                self._unacked[index] += _frames_cost(frames)
                for batch in Batch.bundle_from_frames(frames):
                    core.feed(index, batch)
            else:
                self._take_bundle(index, ring, frames)
            if self._unacked[index] >= threshold:
                self._ack(index)
            if not self._bundle_rounds:
                self._flush()  # what this message made, one message per downstream worker
            self._return_slots()
            if core.finished or core.fan_in.blocked(index):
                break
        self._flush()  # what these messages made, one message per downstream worker

    def _take_bundle(self, index: int, ring: ReceiveRing, frames: list) -> None:
        """Feed the batches of a message from a ring link: batches (one frame each, or a header and its array
        frames) and ring references (one frame each), back to back; references count their unpacked size, as
        their sender counted it."""
        core, position = self.core, 0
        while position < len(frames):
            frame = frames[position]
            if is_reference(frame):
                reference = frame_buffer(frame)
                unpacked = ring.unpack([frame])
                position += 1
                self._unacked[index] += _frames_cost(unpacked)
                batches = Batch.bundle_from_frames(unpacked)
                if len(batches) == 1 and is_forward(reference):
                    self._origin = _Origin(batches[0], reference, unpacked)
                try:
                    for batch in batches:
                        core.feed(index, batch)
                finally:
                    self._origin = None
            else:
                batch, end = Batch.next_from_frames(frames, position)
                self._unacked[index] += _frames_cost(frames[position:end])
                position = end
                core.feed(index, batch)

    def _releaser(self, index: int, kind: int) -> Callable[[int], None]:
        """Ring finalizer: only queues the release (it may run inside any call); ``_return_slots`` or
        ``_ack_all`` sends it."""
        _, _, link = self._inputs[index]
        queue = self._released[index]
        worker = self.spec.worker_index
        return lambda offset: queue.append(RELEASE.pack(link, worker, offset, kind))

    def _return_slots(self) -> None:
        """Send the queued ring releases (with the credit) of each input that has a batch's worth queued."""
        for index, queue in enumerate(self._released):
            if len(queue) >= RELEASE_BATCH:
                self._ack(index)

    def _ack_all(self) -> None:
        """Return every input's credit and queued ring releases (inputs fell quiet, or the stream ended)."""
        for index in range(len(self._inputs)):
            self._ack(index)

    def _ack(self, index: int) -> None:
        """Return the credit of input ``index`` and its queued ring releases, as one message."""
        amount = self._unacked[index]
        _, credit, link = self._inputs[index]
        queue = self._released[index]
        if credit is None or (amount == 0 and not queue):
            return
        self._unacked[index] = 0
        parts = [CREDIT.pack(link, self.spec.worker_index, amount)] if amount else []
        while queue:
            parts.append(queue.pop())
        try:
            credit.send(b"".join(parts), _NOBLOCK)
        except zmq.Again:
            pass  # the upstream worker has finished; nobody waits for this credit or its ring

    # ---- sending -------------------------------------------------------
    def _emit(self, batch: Batch) -> None:
        """Send ``batch`` on; a small one (a single frame) is queued and leaves with the others made at the
        same moment (``_flush``): after the input message that made it, or, from a source, right away, unless
        the source yields back to back (``Stage.back_to_back``): then page batches wait for the epoch's end
        (or until BUNDLE_BYTES are queued)."""
        for index, (router, sockets, credited) in enumerate(self._outputs):
            rings = self._send_rings[index]
            for worker, part in ((0, batch),) if router.workers == 1 else router.route(batch):
                origin = self._origin
                if origin is not None and rings is not None and part is origin.batch and origin.unchanged():
                    self._pass_on(index, worker, origin)
                    continue
                frames = part.to_frames()
                if len(frames) == 1:
                    self._queue((index, worker), frames[0], len(frames[0]) if credited else 0)
                    continue
                cost = _frames_cost(frames)
                if credited:  # the unpacked size: credit, not ring space, bounds what is in flight
                    self._reserve(index, worker, cost)
                if rings is not None and part.nbytes >= SHM_THRESHOLD:
                    frames = self._through_ring(rings[worker], frames)
                    if len(frames) == 1 and self.spec.inputs:
                        # a ring reference leaves with the others this round of input makes; a source's leaves
                        # now, so that downstream works on its batches while it makes the next ones
                        self._queue((index, worker), frames[0], cost, reserved=True)
                        continue
                self._flush((index, worker))  # keep the order of the batches on this link
                self._send(sockets[worker], frames)
        if not self.spec.inputs and (batch.is_control or not self._hold_data
                                     or self._pending_bytes >= BUNDLE_BYTES):
            self._flush()

    def _pass_on(self, link: int, worker: int, origin: "_Origin") -> None:
        """Send on an unchanged batch that came as a forward reference: the same reference under a token of
        this worker's, its arrays held until the downstream worker releases it (no new wire form to make)."""
        self._forward_tokens += 1
        self._forwarded[self._forward_tokens] = origin.frames
        self._queue((link, worker), reforward(origin.reference, self._forward_tokens), _frames_cost(origin.frames))

    def _queue(self, key: tuple[int, int], frame: Any, cost: int, reserved: bool = False) -> None:
        """Queue a one-frame batch or ring reference for link and worker ``key``: such frames leave together,
        one message per worker (``_flush``), each ZeroMQ message costing tens of microseconds of CPU on either
        side. ``cost``: its credit (a ring reference's unpacked size), ``reserved`` already or at ``_flush``."""
        self._pending.setdefault(key, []).append(frame)
        self._pending_bytes += len(frame)
        if not reserved:
            self._pending_cost[key] = self._pending_cost.get(key, 0) + cost
        weight = self._pending_weight[key] = self._pending_weight.get(key, 0) + cost
        if weight >= self.spec.max_inflight >> 2:   # what a receiver acknowledges at once: it waits no longer
            self._flush(key)

    def _flush(self, only: tuple[int, int] | None = None) -> None:
        """Send the queued one-frame batches and references (of one link and worker, or all), as one message
        per worker."""
        if not self._pending:
            return
        keys = list(self._pending) if only is None else [only] if only in self._pending else []
        for key in keys:
            frames = self._pending.pop(key, None)
            if frames is None:
                continue   # sent meanwhile, by a flush while this one waited for credit
            cost = self._pending_cost.pop(key, 0)
            self._pending_weight.pop(key, None)
            self._pending_bytes -= _frames_cost(frames)
            index, worker = key
            _, sockets, credited = self._outputs[index]
            if credited and cost:
                self._reserve(index, worker, cost)
            self._send(sockets[worker], frames)

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
        if packed is None:
            self._flush()   # references still queued here hold slots their receivers cannot release yet
        # wait while downstream makes progress; a ring that stays full (a receiver holding old slots)
        # falls back to the socket: never a deadlock
        credit = self._credit
        assert credit is not None  # a worker with credited outputs has a credit socket
        while packed is None and credit.poll(RING_WAIT_MS, _POLLIN):
            self._collect_credit()
            packed = ring.pack(frames)
            self._tick()
        return packed or frames

    def _allocate(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """``StageContext.allocate``: arena memory, waiting while downstream releases what it holds;
        private memory when the arena stays full."""
        arena, credit = self._arena, self._credit
        assert arena is not None and credit is not None  # _build: only a worker with outputs has an arena
        array = arena.allocate(shape, dtype)
        if array is None:
            self._flush()   # references still queued here hold arena space their receivers cannot release yet
        while array is None and self._forwarded and credit.poll(RING_WAIT_MS, _POLLIN):
            self._collect_credit()
            array = arena.allocate(shape, dtype)
            self._tick()
        return array if array is not None else np.empty(shape, dtype)

    def _reserve(self, link: int, worker: int, cost: int) -> None:
        key = (link, worker)
        while self._inflight[key] > 0 and self._inflight[key] + cost > self.spec.max_inflight:
            self._await_credit()
        self._inflight[key] += cost

    def _await_credit(self) -> None:
        """Wait (up to a poll interval, checking for stop) for credit or released ring slots; what is queued
        leaves first (credit comes back only for what was sent)."""
        self._flush()
        credit = self._credit
        assert credit is not None  # only credited links wait for credit
        if credit.poll(POLL_MS, zmq.POLLIN):
            self._collect_credit()
        else:
            self._check_alive()
        self._tick()

    def _collect_credit(self) -> None:
        """Take every credit message waiting: bytes downstream workers have taken off their sockets."""
        while self._credit is not None and cast(int, self._credit.get(_EVENTS)) & _POLLIN:
            message = self._credit.recv()
            if len(message) % RELEASE.size == CREDIT.size:
                link, worker, amount = CREDIT.unpack_from(message)
                if (link, worker) in self._inflight:
                    self._inflight[(link, worker)] = max(0, self._inflight[(link, worker)] - amount)
                start = CREDIT.size
            elif len(message) % RELEASE.size == 0 and message:
                start = 0
            else:
                raise CorruptData(f"credit message of {len(message)} bytes, not a credit ({CREDIT.size}) and/or "
                                  f"releases ({RELEASE.size} each)")
            for release in RELEASE.iter_unpack(message[start:]):
                self._release(*release)

    def _release(self, link: int, worker: int, offset: int, kind: int) -> None:
        """A downstream worker let go of a ring slot (SLOT) or of a batch this worker forwarded (FORWARDED)."""
        if kind == FORWARDED:
            if self._forwarded.pop(offset, None) is None:
                raise CorruptData(f"ring release of unknown forwarded batch {offset}")
            # the held arrays may have been the last views of an upstream slot: its release is queued and sent
            # with the credit
            return
        rings = self._send_rings[link] if link < len(self._send_rings) else None
        if kind != SLOT or rings is None or worker >= len(rings):
            raise CorruptData(f"ring release of kind {kind} for unknown link {link} worker {worker}")
        rings[worker].release(offset)

    def _send(self, socket: zmq.Socket, frames: list) -> None:
        """Send one multipart message, waiting (and checking for stop) while the socket is full.

        Small frames are copied (cheaper than tracking a zero-copy buffer), large ones are not.
        """
        last = len(frames) - 1
        while True:
            try:
                socket.send(frames[0], _MORE_NOBLOCK if last else _NOBLOCK, copy=len(frames[0]) < ZERO_COPY_MIN)
                break
            except zmq.Again:
                if not socket.poll(POLL_MS, zmq.POLLOUT):
                    self._check_alive()
        for index in range(1, last + 1):  # once the first part is queued, ZeroMQ accepts the rest
            frame = frames[index]
            socket.send(frame, _MORE_NOBLOCK if index < last else _NOBLOCK, copy=len(frame) < ZERO_COPY_MIN)


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
