"""A local hop: the link between two workers of one pipeline on one machine, over a plain Unix socket.

ZeroMQ over ``ipc://`` hands every message to the sender's I/O thread, which
writes it to the kernel, and to the receiver's I/O thread, which passes it to
the receiving thread: four thread wake-ups and about 50 us of CPU per message,
measured here, which is most of what a pass-through stage cost per batch. The
links of the process executor only ever join two workers of one run (in its
private directory), so they use one Unix stream socket per link instead,
written and read by the workers themselves (about a quarter of that cost):
multipart messages downstream, credit and ring releases upstream on the same
connection, in order. Links to other hosts (``pagepipe stage``) stay ZeroMQ.

Wire form, little-endian, every part at an 8-byte aligned offset (array views
of a message keep their alignment): ``<II`` (bytes after this prefix, frame
count), one ``<I`` length per frame padded to 8 bytes, then each frame padded
to 8 bytes. Lengths are checked as they are read.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import time
from typing import Callable

from .errors import ConfigError, CorruptData

_PREFIX = struct.Struct("<II")
_ALIGN = 8
_PADDING = tuple(bytes(size) for size in range(_ALIGN))
_LENGTHS = [struct.Struct(f"<{count}I") for count in range(17)]
CHUNK = 64 << 10
"""Bytes read per call; a message longer than this is read straight into its own buffer."""
SMALL_MESSAGE = 4096
"""Messages up to this size are joined into one buffer when queued; larger ones are written from their frames."""
MAX_PARTS = 256
"""Buffers per sendmsg call (Linux takes at most 1024)."""
MAX_MESSAGE = (1 << 32) - 1
MAX_FRAMES = 1 << 16
CONNECT_RETRY = 0.002
"""Seconds between attempts to connect to a downstream worker that has not bound its link yet."""


class Closed(Exception):
    """The other end of the hop has closed it (its worker ended or died)."""


def _lengths(count: int) -> struct.Struct:
    return _LENGTHS[count] if count < len(_LENGTHS) else struct.Struct(f"<{count}I")


def _padded(size: int) -> int:
    return (size + _ALIGN - 1) & -_ALIGN


def encode(frames: list) -> list:
    """The buffers that make one message of ``frames`` (bytes-like objects whose len() is their size)."""
    sizes = [len(frame) for frame in frames]
    count = len(sizes)
    if count > MAX_FRAMES:
        raise ConfigError(f"local hop: a message of {count} frames (at most {MAX_FRAMES})")
    lengths = _lengths(count).pack(*sizes)
    parts: list = [b"", lengths, _PADDING[-len(lengths) % _ALIGN]]
    for frame, size in zip(frames, sizes):
        parts.append(frame)
        if size % _ALIGN:
            parts.append(_PADDING[-size % _ALIGN])
    body = _padded(len(lengths)) + sum(_padded(size) for size in sizes)
    if body > MAX_MESSAGE:
        raise ConfigError(f"local hop: a message of {body} bytes (at most {MAX_MESSAGE})")
    parts[0] = _PREFIX.pack(body, count)
    return parts


def decode(message: memoryview) -> list[memoryview]:
    """The frames of one whole message (as views of it); CorruptData if its lengths disagree."""
    _, count = _PREFIX.unpack_from(message)
    position = _PREFIX.size + _padded(4 * count)
    if count > MAX_FRAMES or position > len(message):
        raise CorruptData(f"local hop: a message of {len(message)} bytes cannot hold {count} frame lengths")
    frames = []
    for size in _lengths(count).unpack_from(message, _PREFIX.size):
        end = position + size
        if end > len(message):
            raise CorruptData(f"local hop: frame of {size} bytes beyond its {len(message)}-byte message")
        frames.append(message[position:end])
        position = _padded(end)
    if position != len(message):
        raise CorruptData(f"local hop: {len(message) - position} bytes left over after {count} frames")
    return frames


class Connection:
    """One end of a hop: sends whole messages (queueing what the socket does not take now) and returns the
    whole messages that have arrived, never blocking."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.socket = sock
        self.fileno = sock.fileno()
        self.closed = False
        """The other end has closed: everything it sent has been received."""
        self.unwritable = False
        """The other end no longer reads (what is sent is dropped; what it sent before can still be read)."""
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)
        self._have = 0            # bytes at the start of _buffer: the beginning of a message
        self._big: bytearray | None = None   # a long message being read, and how much of it has come
        self._filled = 0
        self._unsent: list[memoryview] = []
        self._queued = 0

    # ---- sending -------------------------------------------------------
    @property
    def backlog(self) -> bool:
        """Whether messages (or the rest of one) wait to be written."""
        return bool(self._unsent)

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def queue(self, frames: list) -> None:
        """Add one message to what ``flush`` writes: the messages a worker makes while it takes what has
        arrived leave in one call, and wake the reader once. A hop whose reader has gone drops it."""
        if self.unwritable:
            return
        parts = encode(frames)
        total = sum(map(len, parts))
        if total <= SMALL_MESSAGE:
            self._unsent.append(memoryview(b"".join(parts)))
        else:
            self._unsent += [memoryview(part).cast("B") for part in parts]
        self._queued += total

    def send(self, frames: list) -> bool:
        """Queue one message and write what the socket takes; True when all of it went (False: ``flush``
        later)."""
        self.queue(frames)
        return self.flush()

    def flush(self) -> bool:
        """Write what is queued; True when nothing is left."""
        unsent = self._unsent
        while unsent and not self.unwritable:
            try:
                sent = self.socket.sendmsg(unsent[:MAX_PARTS]) if len(unsent) > 1 else self.socket.send(unsent[0])
            except BlockingIOError:
                return False
            except (BrokenPipeError, ConnectionResetError):
                self.unwritable = True
                unsent.clear()
                self._queued = 0
                return True
            self._queued -= sent
            self._advance(sent)
        return True

    def _advance(self, sent: int) -> None:
        unsent = self._unsent
        while sent:
            first = unsent[0]
            if sent >= len(first):
                sent -= len(first)
                unsent.pop(0)
            else:
                unsent[0] = first[sent:]
                sent = 0

    # ---- receiving -----------------------------------------------------
    def receive(self) -> list[list[memoryview]]:
        """The messages that have arrived whole (each as its frames); Closed once the other end has closed
        and everything it sent has been returned."""
        messages: list[list[memoryview]] = []
        if self.closed:
            if self._have or self._big is not None:
                raise CorruptData("local hop: the other end closed it in the middle of a message")
            raise Closed()
        while True:
            try:
                if self._big is not None:
                    got = self.socket.recv_into(memoryview(self._big)[self._filled:])
                else:
                    got = self.socket.recv_into(self._view[self._have:])
            except BlockingIOError:
                return messages
            except ConnectionResetError:
                got = 0
            if got == 0:
                self.closed = True
                return messages if messages else self.receive()
            if self._big is not None:
                self._filled += got
                if self._filled == len(self._big):
                    messages.append(decode(memoryview(self._big)))
                    self._big = None
                continue
            self._have += got
            self._split(messages)
            if got < CHUNK // 2 and self._big is None:
                return messages   # the socket is most likely empty: spare the call that says so

    def _split(self, messages: list[list[memoryview]]) -> None:
        """Take the whole messages at the start of the buffer; start a long one's own buffer."""
        view, have, position = self._view, self._have, 0
        while have - position >= _PREFIX.size:
            body, _ = _PREFIX.unpack_from(view, position)
            total = _PREFIX.size + body
            if body % _ALIGN:
                raise CorruptData(f"local hop: a message of {body} bytes, not a multiple of {_ALIGN}")
            if have - position >= total:
                messages.append(decode(memoryview(bytes(view[position:position + total]))))  # a copy: aligned
                position += total
            elif total > CHUNK:
                self._big = bytearray(total)
                self._filled = have - position
                self._big[:self._filled] = view[position:have]
                position = have
            else:
                break
        if position:
            self._buffer[:have - position] = view[position:have]
            self._have = have - position

    def close(self) -> None:
        self.socket.close()


class Listener:
    """The receiving worker's end before the sending worker has connected: a socket bound at ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.bind(path)
        self.socket.listen(1)
        self.socket.setblocking(False)
        self.fileno = self.socket.fileno()

    def accept(self) -> Connection | None:
        """The connection, once the sending worker has made it (the listener is closed then)."""
        try:
            sock, _ = self.socket.accept()
        except BlockingIOError:
            return None
        self.socket.close()
        return Connection(sock)

    def close(self) -> None:
        self.socket.close()


def connect(path: str, check_alive: Callable[[], None]) -> Connection:
    """Connect to the receiving worker's ``path``, waiting (``check_alive`` between attempts) until it is bound."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return Connection(sock)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.ENOENT, errno.ECONNREFUSED):
                raise
        check_alive()
        time.sleep(CONNECT_RETRY)


def local_path(endpoint: str) -> str:
    """The file of an ``ipc://`` endpoint, for a hop; ConfigError for any other transport."""
    if not endpoint.startswith("ipc://"):
        raise ConfigError(f"a credited link must be local (ipc://), not {endpoint!r}")
    path = endpoint[len("ipc://"):]
    if len(os.fsencode(path)) >= 108:
        raise ConfigError(f"local hop: socket path {path!r} is too long for a Unix socket")
    return path
