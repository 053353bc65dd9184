"""A stage worker linked by ZeroMQ: the body of every process of the process executor.

Each worker rebuilds its stage from a ``WorkerSpec`` (class path + property
values), binds one PULL socket per upstream worker, connects one PUSH socket
per downstream worker, and posts bus messages to the supervisor.

Flow control is byte-counted credit: a sender keeps at most ``max_inflight``
bytes unacknowledged per downstream worker and blocks (polling its credit
socket) beyond that; a receiver returns credit for what it has taken off the
socket. Links without a credit endpoint (``pagepipe stage`` over tcp) rely
on ZeroMQ's high-water marks instead.

Endpoints bind or connect by default as their role says (inputs bind, outputs
connect); a leading ``@`` forces bind and ``>`` forces connect (the czmq
convention), so a pipeline spread over hosts can choose who listens.
"""
from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from .batch import Batch
from .bus import STATS_INTERVAL, Message
from .core import WorkerCore
from .registry import import_target
from .routing import Router
from .stage import Stage, StageContext

POLL_MS = 100
DRAIN_LIMIT = 16
CREDIT = struct.Struct("<IIQ")  # output link index, downstream worker index, bytes
STANDALONE_BATCH_ESTIMATE = 1 << 20
PR_SET_PDEATHSIG = 1


class Stopped(Exception):
    """The supervisor asked this worker to stop, or is gone."""


@dataclass
class InputSpec:
    endpoint: str
    credit_endpoint: str | None = None
    credit_link: int = 0
    """Index of this link among the upstream worker's outputs."""


@dataclass
class OutputSpec:
    endpoints: list[str]
    shard_key: str | None = None
    credited: bool = False


@dataclass
class WorkerSpec:
    """Everything a worker needs to rebuild its stage and its links."""

    stage_target: str
    properties: dict[str, Any]
    stage_name: str
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


def attach(socket: zmq.Socket, endpoint: str, bind_by_default: bool) -> None:
    """Bind or connect ``socket`` as the endpoint's prefix (``@`` bind, ``>`` connect) or its role says."""
    if endpoint[:1] in ("@", ">"):
        bind_by_default, endpoint = endpoint[0] == "@", endpoint[1:]
    (socket.bind if bind_by_default else socket.connect)(endpoint)


def _frames_cost(frames: list) -> int:
    """Bytes of a multipart message, whether built for sending or received as zmq Frames."""
    return sum(len(frame) if isinstance(frame, zmq.Frame) else memoryview(frame).nbytes for frame in frames)


class Worker:
    """Run one stage worker until its stream ends, it fails, or it is told to stop."""

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
        self._last_stats = time.monotonic()
        self._inflight: dict[tuple[int, int], int] = {}
        self._unacked: list[int] = [0] * len(spec.inputs)
        self.core: WorkerCore | None = None

    # ---- bus -----------------------------------------------------------
    def post(self, kind: str, **fields: Any) -> None:
        message = Message(kind, self.spec.stage_name, self.spec.worker_index, fields)
        if self._bus is not None:
            self._bus.send_json(message.to_dict())
        elif self.local_post is not None:
            self.local_post(message)

    # ---- lifecycle -----------------------------------------------------
    def run(self) -> int:
        """0 when the stream ended cleanly, 1 on failure (already reported on the bus), 2 when stopped."""
        code = 0
        try:
            if self.spec.bus_endpoint:
                self._bus = self._socket(zmq.PUSH)
                self._bus.connect(self.spec.bus_endpoint)
            self._check_alive()
            self._build()
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
            self.post("error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
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
        context = StageContext(spec.stage_name, spec.worker_index, spec.worker_count, post=self.post)
        self.core = WorkerCore(self.stage, context, len(spec.inputs), spec.output_format,
                               self._emit, spec.stamp_pages)
        self._inputs = []
        standalone_hwm = max(2, spec.max_inflight // STANDALONE_BATCH_ESTIMATE)
        for source in spec.inputs:
            socket = self._socket(zmq.PULL, hwm=0 if source.credit_endpoint else standalone_hwm)
            attach(socket, source.endpoint, bind_by_default=True)
            credit = None
            if source.credit_endpoint:
                credit = self._socket(zmq.PUSH, hwm=0)
                attach(credit, source.credit_endpoint, bind_by_default=False)
            self._inputs.append((socket, credit, source.credit_link))
        self._outputs = []
        for index, target in enumerate(spec.outputs):
            sockets = []
            for endpoint in target.endpoints:
                socket = self._socket(zmq.PUSH, hwm=0 if target.credited else standalone_hwm)
                attach(socket, endpoint, bind_by_default=False)
                sockets.append(socket)
            self._outputs.append((Router(len(sockets), target.shard_key), sockets, target.credited))
            for worker in range(len(sockets)):
                self._inflight[(index, worker)] = 0
        self._credit = None
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
        if self.core is None:
            return code
        try:
            self.core.stop()
        except BaseException as exc:
            if code == 0:
                self.post("error", reason=f"{type(exc).__name__} in stop(): {exc}", traceback=traceback.format_exc())
                return 1
        return code

    def _close(self, code: int) -> None:
        for socket in self._sockets:
            if code != 0 and socket is not self._bus:
                socket.linger = 0
            socket.close()
        self._context.term()

    def _check_alive(self) -> None:
        if self.stop_event is not None and self.stop_event.is_set():
            raise Stopped()
        if self.spec.supervisor_pid:
            try:
                os.kill(self.spec.supervisor_pid, 0)
            except ProcessLookupError:
                raise Stopped() from None

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= STATS_INTERVAL:
            self._last_stats = now
            self._post_statistics()
            self._check_alive()

    def _post_statistics(self) -> None:
        stats = self.core.stats
        stats.queue_bytes = sum(self._inflight.values())
        if self.stop_event is None:  # a process of its own
            stats.cpu_seconds = time.process_time()
        self.post("stats", **self.core.statistics())

    # ---- receiving -----------------------------------------------------
    def _produce(self) -> None:
        for _ in self.core.produce():
            if self.stop_event is not None and self.stop_event.is_set():
                raise Stopped()
            self._tick()

    def _serve(self) -> None:
        poller = zmq.Poller()
        registered: set[int] = set()
        core = self.core
        while not core.finished:
            for index, (socket, _, _) in enumerate(self._inputs):
                wanted = not core.fan_in.blocked(index)
                if wanted and index not in registered:
                    poller.register(socket, zmq.POLLIN)
                    registered.add(index)
                elif not wanted and index in registered:
                    poller.unregister(socket)
                    registered.discard(index)
            ready = dict(poller.poll(POLL_MS))
            if not ready:
                self._check_alive()
            for index, (socket, _, _) in enumerate(self._inputs):
                if socket in ready and not core.finished:
                    self._drain(index, socket)
            self._tick()

    def _drain(self, index: int, socket: zmq.Socket) -> None:
        core = self.core
        for _ in range(DRAIN_LIMIT):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._unacked[index] += _frames_cost(frames)
            if self._unacked[index] >= self.spec.max_inflight // 4:
                self._ack(index)
            core.feed(index, Batch.from_frames(frames))
            if core.finished or core.fan_in.blocked(index):
                break
        self._ack(index)

    def _ack(self, index: int) -> None:
        amount = self._unacked[index]
        _, credit, link = self._inputs[index]
        if credit is None or amount == 0:
            return
        self._unacked[index] = 0
        try:
            credit.send(CREDIT.pack(link, self.spec.worker_index, amount), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the upstream worker has finished; nobody waits for this credit

    # ---- sending -------------------------------------------------------
    def _emit(self, batch: Batch) -> None:
        for index, (router, sockets, credited) in enumerate(self._outputs):
            for worker, part in router.route(batch):
                frames = part.to_frames()
                if credited:
                    self._reserve(index, worker, _frames_cost(frames))
                self._send(sockets[worker], frames)

    def _reserve(self, link: int, worker: int, cost: int) -> None:
        key = (link, worker)
        while self._inflight[key] > 0 and self._inflight[key] + cost > self.spec.max_inflight:
            if self._credit.poll(POLL_MS, zmq.POLLIN):
                while True:
                    try:
                        message = self._credit.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    returned_link, returned_worker, amount = CREDIT.unpack(message)
                    returned = (returned_link, returned_worker)
                    if returned in self._inflight:
                        self._inflight[returned] = max(0, self._inflight[returned] - amount)
            else:
                self._check_alive()
            self._tick()
        self._inflight[key] += cost

    def _send(self, socket: zmq.Socket, frames: list) -> None:
        while True:
            try:
                socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                if not socket.poll(POLL_MS, zmq.POLLOUT):
                    self._check_alive()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent goes away."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the supervisor-pid check still ends orphaned workers


def run_worker_process(spec: WorkerSpec) -> None:
    """Entry point of a worker process (spawn/forkserver target)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    sys.exit(Worker(spec).run())
