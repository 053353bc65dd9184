"""The acknowledgement back channel: receiver -> sender, on its own ZeroMQ socket.

The receiver's replica-sink owns an ``AckSender`` (PUSH, connects by default)
and sends one small JSON message per event:

    {"type": "ack", "epoch": N, "stream": S}          epoch N is committed at the replica
    {"type": "resync", "reason": "...", "epoch": N}   send every page whole in the next epoch
    {"type": "discarded", "epoch": N, "reason": "..."}   epoch N reached the replica and was dropped:
                                                      it will never be acknowledged

The sender owns an ``AckListener`` (PULL, binds by default) whose thread
parses those messages (untrusted: size, JSON shape and types are checked;
malformed ones are counted and dropped) and calls back: acknowledgements
release ``wait_for(epoch)`` (the Remus output-commit rule: release output only
once the backup has the state) and go to the tracker's ``acknowledged(epoch)``;
resync requests go to the tracker's ``request_resync()``, discard notices to its
``epoch_discarded(epoch)`` (so a ``checkpoint(wait=True)`` for that epoch fails
at once instead of at its timeout; epochs a receiver drops before they reach
its replica-sink, such as ``deframe resume=true`` skipping to a resync segment,
are not noticed this way).
PUSH queues messages until the listener is reachable, so an early resync
request is not lost; if the queue is full, messages are dropped and counted.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import zmq

from pipeline.errors import TransportError

MAX_MESSAGE_BYTES = 4096
_POLL_MS = 50


def _open_socket(context: zmq.Context, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
    socket = context.socket(kind)
    try:
        (socket.bind if bind else socket.connect)(endpoint)
    except zmq.ZMQError as exc:
        socket.close(linger=0)
        raise TransportError(f"ack channel: cannot {'bind' if bind else 'connect'} {endpoint!r} ({exc})") from None
    return socket


class AckSender:
    """Receiver side: sends acknowledgements and resync requests without ever blocking."""

    def __init__(self, endpoint: str, *, bind: bool = False, linger: float = 1.0, queue: int = 10000):
        self._context = zmq.Context()
        self._socket = _open_socket(self._context, zmq.PUSH, endpoint, bind)
        self._socket.setsockopt(zmq.SNDHWM, queue)
        self._socket.setsockopt(zmq.LINGER, int(linger * 1000))
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint

    def ack(self, epoch: int, **fields: Any) -> bool:
        """Say epoch ``epoch`` is committed; False if the message had to be dropped."""
        return self._send({"type": "ack", "epoch": int(epoch), **fields})

    def request_resync(self, reason: str, **fields: Any) -> bool:
        """Ask the sender to send every page whole in its next epoch."""
        return self._send({"type": "resync", "reason": str(reason), **fields})

    def discarded(self, epoch: int, reason: str) -> bool:
        """Say epoch ``epoch`` was dropped and will never be acknowledged."""
        return self._send({"type": "discarded", "epoch": int(epoch), "reason": str(reason)})

    def _send(self, message: dict[str, Any]) -> bool:
        try:
            self._socket.send(json.dumps(message).encode(), zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        self._socket.close()
        self._context.term()


def parse_message(raw: bytes) -> dict[str, Any]:
    """Check one untrusted back-channel message; raise ValueError saying what is wrong."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{len(raw)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested too deeply: {raw[:80]!r}") from None
    if not isinstance(message, dict) or message.get("type") not in ("ack", "resync", "discarded"):
        raise ValueError(f"not an ack, resync or discarded message: {raw[:80]!r}")
    epoch = message.get("epoch")
    if message["type"] != "resync" and (not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
        raise ValueError(f"{message['type']} without a valid epoch: {raw[:80]!r}")
    return message


class AckListener:
    """Sender side: a thread receiving the back channel, tracking the highest acknowledged epoch.

    ``on_ack(epoch)`` and ``on_resync(reason)`` run on the listener thread.
    """

    def __init__(self, endpoint: str, *, bind: bool = True,
                 on_ack: Callable[[int], None] | None = None,
                 on_resync: Callable[[str], None] | None = None,
                 on_discard: Callable[[int], None] | None = None, history: int = 100000):
        self._context = zmq.Context()
        self._socket = _open_socket(self._context, zmq.PULL, endpoint, bind)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self.on_ack = on_ack
        self.on_resync = on_resync
        self.on_discard = on_discard
        self.acked_epoch = 0
        self.ack_times: dict[int, float] = {}
        """time.monotonic() at which each epoch's acknowledgement arrived (the last ``history``)."""
        self.counters = {"acks": 0, "resyncs": 0, "discarded": 0, "malformed": 0}
        self.resync_pending = False
        """True from a resync request until the next acknowledgement."""
        self._history = history
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ack-listener", daemon=True)
        self._thread.start()

    def attach(self, tracker: Any) -> "AckListener":
        """Route acknowledgements, resync requests and discard notices to a tracker (``acknowledged``,
        ``request_resync``, ``epoch_discarded``; the first and last where it has them)."""
        if hasattr(tracker, "acknowledged"):
            self.on_ack = tracker.acknowledged
        if hasattr(tracker, "epoch_discarded"):
            self.on_discard = tracker.epoch_discarded
        self.on_resync = lambda reason: tracker.request_resync()
        return self

    def wait_for(self, epoch: int, timeout: float | None = None, *, or_resync: bool = False) -> bool:
        """Block until ``epoch`` (or a later one) is acknowledged; False on timeout.

        With ``or_resync``, also return (True) while a resync request is unanswered: the
        epochs in flight were discarded and only the next, resync, epoch will be acknowledged.
        """
        with self._changed:
            return self._changed.wait_for(
                lambda: self.acked_epoch >= epoch or (or_resync and self.resync_pending), timeout)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(_POLL_MS):
                continue
            raw = self._socket.recv()
            try:
                message = parse_message(raw)
            except ValueError:
                self.counters["malformed"] += 1
                continue
            if message["type"] == "ack":
                self._acknowledged(message["epoch"])
            elif message["type"] == "discarded":
                self.counters["discarded"] += 1
                if self.on_discard is not None:
                    self.on_discard(message["epoch"])
            else:
                if self.on_resync is not None:
                    self.on_resync(str(message.get("reason", "")))
                with self._changed:
                    self.counters["resyncs"] += 1
                    self.resync_pending = True
                    self._changed.notify_all()

    def _acknowledged(self, epoch: int) -> None:
        now = time.monotonic()
        with self._changed:
            self.counters["acks"] += 1
            self.ack_times[epoch] = now
            if len(self.ack_times) > self._history:
                del self.ack_times[next(iter(self.ack_times))]
            self.acked_epoch = max(self.acked_epoch, epoch)
            self.resync_pending = False   # a commit after a resync request: the replica is in sync again
            self._changed.notify_all()
        if self.on_ack is not None:
            self.on_ack(epoch)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._socket.close(linger=0)
        self._context.term()
