"""The acknowledgement back channel: receiver -> sender, on its own ZeroMQ socket.

The receiver's replica-sink owns an ``AckSender`` (PUSH, connects by default)
and sends one small JSON message per event:

    {"type": "ack", "epoch": N, "stream_id": H}       epoch N of stream H (32 hex digits) is committed
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

Who may speak (docs/SECURITY.md): on tcp the channel runs CurveZMQ
(stages.common.security): the listener binds as the CURVE server and admits
only the receivers whose public keys are in its ``authorized_keys`` directory,
and checks each message's ZAP ``User-Id`` against that list again; the sender
connects with ``server_key``. Messages beyond ``MAX_MESSAGE_BYTES`` are refused
by ZeroMQ as they are announced, before any memory is allocated. An
acknowledgement counts only if it names the listener's stream
(``stream_id``, the tracker's identity that frame writes into the wire): an
acknowledgement of another stream, or none, never releases a waiter.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import zmq

from pipeline.errors import TransportError

from .security import Gatekeeper, LinkSecurity, link_security

MAX_MESSAGE_BYTES = 4096
QUEUED_MESSAGES = 1000
"""Messages the listener's socket holds per peer (so at most this many x MAX_MESSAGE_BYTES each)."""
_POLL_MS = 50
_WHERE = "ack channel"


def _open_socket(kind: int, endpoint: str, bind: bool, security: LinkSecurity,
                 configure=lambda socket: None) -> tuple[zmq.Context, zmq.Socket, Gatekeeper | None]:
    context = security.context()
    socket = context.socket(kind)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    configure(socket)
    gatekeeper = None
    try:
        gatekeeper = security.apply(socket)
        (socket.bind if bind else socket.connect)(endpoint)
    except (zmq.ZMQError, TransportError) as exc:
        if gatekeeper is not None:
            gatekeeper.close()
        socket.close(linger=0)
        context.term()
        raise TransportError(f"{_WHERE}: cannot {'bind' if bind else 'connect'} {endpoint!r} ({exc})") from None
    return context, socket, gatekeeper


class AckSender:
    """Receiver side: sends acknowledgements and resync requests without ever blocking."""

    def __init__(self, endpoint: str, *, bind: bool = False, linger: float = 1.0, queue: int = 10000,
                 secret_key: str = "", public_key: str = "", server_key: str = "", authorized_keys: str = "",
                 insecure: bool = False):
        """Keys as for ``link_security``: on tcp, this end's ``secret_key`` and the listener's ``server_key``."""
        security = link_security(_WHERE, endpoint, bind, secret_key=secret_key, public_key=public_key,
                                 server_key=server_key, authorized_keys=authorized_keys, insecure=insecure,
                                 max_connections=2)
        self._context, self._socket, self._gatekeeper = _open_socket(zmq.PUSH, endpoint, bind, security)
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
        if self._gatekeeper is not None:
            self._gatekeeper.close()
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
    stream = message.get("stream_id")
    if stream is not None and not isinstance(stream, str):
        raise ValueError(f"{message['type']} with a stream_id that is not a string: {raw[:80]!r}")
    return message


class AckListener:
    """Sender side: a thread receiving the back channel, tracking the highest acknowledged epoch.

    ``on_ack(epoch)`` and ``on_resync(reason)`` run on the listener thread. ``stream_id`` (or the
    attached tracker's) is the stream whose acknowledgements count; None accepts any.
    """

    def __init__(self, endpoint: str, *, bind: bool = True,
                 on_ack: Callable[[int], None] | None = None,
                 on_resync: Callable[[str], None] | None = None,
                 on_discard: Callable[[int], None] | None = None, history: int = 100000,
                 stream_id: str | None = None, secret_key: str = "", public_key: str = "",
                 authorized_keys: str = "", server_key: str = "", insecure: bool = False, max_connections: int = 2):
        """Keys as for ``link_security``: on tcp, this end's ``secret_key`` and ``authorized_keys``, the
        directory of the receivers' public keys."""
        self._security = link_security(_WHERE, endpoint, bind, secret_key=secret_key, public_key=public_key,
                                       server_key=server_key, authorized_keys=authorized_keys, insecure=insecure,
                                       max_connections=max_connections)
        self._context, self._socket, self._gatekeeper = _open_socket(
            zmq.PULL, endpoint, bind, self._security, lambda socket: socket.setsockopt(zmq.RCVHWM, QUEUED_MESSAGES))
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._stream_of: Callable[[], str | None] = lambda: stream_id
        self.on_ack = on_ack
        self.on_resync = on_resync
        self.on_discard = on_discard
        self.acked_epoch = 0
        self.ack_times: dict[int, float] = {}
        """time.monotonic() at which each epoch's acknowledgement arrived (the last ``history``)."""
        self.counters = {"acks": 0, "resyncs": 0, "discarded": 0, "malformed": 0, "foreign": 0,
                         "unauthenticated": 0}
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
        if hasattr(tracker, "stream_id"):
            self._stream_of = lambda: tracker.stream_id
        return self

    @property
    def stream_id(self) -> str | None:
        """The stream whose acknowledgements count (None: any)."""
        return self._stream_of()

    def take_warnings(self) -> list[str]:
        """Peers refused since the last call (no key, unknown key, too many connections), for a bus warning."""
        return self._gatekeeper.take_warnings() if self._gatekeeper is not None else []

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
            frame = self._socket.recv(copy=False)
            if not self._authenticated(frame):
                continue
            try:
                message = parse_message(frame.bytes)
            except ValueError:
                self.counters["malformed"] += 1
                continue
            if message["type"] == "ack":
                expected = self._stream_of()
                if expected is not None and message.get("stream_id") != expected:
                    self.counters["foreign"] += 1      # another stream's (or no stream's): releases nothing
                    continue
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

    def _authenticated(self, frame: zmq.Frame) -> bool:
        """A whole single-part message from an allowed key (ZAP checked it; checked again per message)."""
        if frame.more:
            while self._socket.getsockopt(zmq.RCVMORE):
                self._socket.recv(copy=False)
            self.counters["malformed"] += 1
            return False
        if self._security.curve and str(frame.get("User-Id")).encode() not in self._security.allowed:
            self.counters["unauthenticated"] += 1
            return False
        return True

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
        if self._gatekeeper is not None:
            self._gatekeeper.close()
        self._socket.close(linger=0)
        self._context.term()
