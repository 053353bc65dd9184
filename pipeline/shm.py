"""Shared-memory rings: large batch payloads cross a process boundary with one copy instead of two.

Over ``ipc://`` a ZeroMQ message is copied into the kernel and out again.
For large messages the process executor instead copies the big frames into a
ring file in ``/dev/shm`` shared by one sender worker and one receiver
worker, and sends only a small reference frame over ZeroMQ. The receiver maps
the ring read-only and builds its arrays as views of it; a ring slot is
released (and the release returned with the credit) only once every array
viewing it is gone, so a stage that keeps input arrays simply holds ring space,
never corruption; when the ring is full the sender falls back to sending
the frames through the socket, so a receiver that holds many slots (a stage
keeping a whole epoch of input) cannot deadlock its sender.

Forwarding: a worker whose output arrays are still views of a ring it
receives from (a pass-through stage) sends a *forward reference* naming that
ring file and offsets instead of copying, and holds the arrays until the next
worker releases the reference; so a slot returns to its writer only when the
last worker along the chain lets go. Ring files are only opened by name inside
the run's own directory, read-only, and every offset is bounds-checked.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import weakref
from collections import deque
from typing import Callable

import numpy as np

from .errors import CorruptData

SHM_THRESHOLD = 256 << 10
"""Messages with at least this many bytes in large frames go through the ring."""
LARGE_FRAME = 64 << 10
TAG = b"PPSHM\x00\x00\x01"
FORWARD_TAG = b"PPSHM\x00\x00\x02"
_HEAD = struct.Struct("<QQI")       # slot offset, slot length, frame count
_FRAME = struct.Struct("<IQQ")      # frame index, offset in slot (in the ring file when forwarded), length
_FORWARD_HEAD = struct.Struct("<QIH")  # token, frame count, ring file name length
ALIGNMENT = 64
_RING_NAME = re.compile(r"r\d+\.\d+\.\d+\.\d+")


def ring_name(node: int, worker: int, link: int, downstream_worker: int) -> str:
    """File name of the ring from ``worker`` of plan node ``node`` to ``downstream_worker`` on output ``link``."""
    return f"r{node}.{worker}.{link}.{downstream_worker}"


class SendRing:
    """The sender's side of a ring: allocates slots in order, frees them in any order."""

    def __init__(self, path: str, capacity: int):
        self.capacity = capacity
        self.memory = np.memmap(path, dtype=np.uint8, mode="w+", shape=(capacity,))
        self._head = 0   # logical positions, growing forever
        self._tail = 0
        self._slots: deque[list] = deque()   # [logical start, logical end, released]
        self._by_offset: dict[int, list] = {}

    def pack(self, frames: list) -> list | None:
        """Frames with the large ones moved into a ring slot, or None when the ring has no room now."""
        large = [(i, memoryview(f).cast("B")) for i, f in enumerate(frames)
                 if not isinstance(f, bytes) and memoryview(f).nbytes >= LARGE_FRAME]
        sizes = [(view.nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for _, view in large]
        offset = self._allocate(sum(sizes))
        if offset is None:
            return None
        head = [_HEAD.pack(offset, sum(sizes), len(large))]
        position = 0
        packed = list(frames)
        for (index, view), size in zip(large, sizes):
            self.memory[offset + position: offset + position + view.nbytes] = np.frombuffer(view, dtype=np.uint8)
            head.append(_FRAME.pack(index, position, view.nbytes))
            packed[index] = b""
            position += size
        return [TAG + b"".join(head)] + packed

    def fits(self, frames: list) -> bool:
        """Whether this message is worth sending through the ring and could ever fit."""
        total = sum(memoryview(f).nbytes for f in frames if not isinstance(f, bytes)
                    and memoryview(f).nbytes >= LARGE_FRAME)
        return SHM_THRESHOLD <= total <= self.capacity // 2

    def _allocate(self, size: int) -> int | None:
        physical = self._head % self.capacity
        if physical + size > self.capacity:  # skip the ring's end: a filler slot, released at once
            filler = [self._head, self._head + self.capacity - physical, True]
            if filler[1] + size - self._tail > self.capacity:
                return None
            self._slots.append(filler)
            self._head = filler[1]
            physical = 0
        if self._head + size - self._tail > self.capacity:
            return None
        slot = [self._head, self._head + size, False]
        self._slots.append(slot)
        self._by_offset[physical] = slot
        self._head += size
        return physical

    def release(self, offset: int) -> None:
        """The receiver no longer uses the slot at ``offset``."""
        slot = self._by_offset.pop(offset, None)
        if slot is None:
            raise CorruptData(f"shared-memory ring: release of unknown slot at offset {offset}")
        slot[2] = True
        while self._slots and self._slots[0][2]:
            self._tail = self._slots.popleft()[1]

    @property
    def used(self) -> int:
        return self._head - self._tail


class RingMaps:
    """The ring files one worker has mapped read-only, by name; finds which one a buffer lies in."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, int, int]] = {}   # name -> mapping, address, size

    def open(self, directory: str, name: str, trusted: bool = False) -> mmap.mmap:
        """The mapping of ring ``name`` in ``directory`` (opened once).

        A name from the wire (not ``trusted``) must look like a ring's, or it is CorruptData.
        """
        known = self._maps.get(name)
        if known is not None:
            return known[0]
        if not trusted and not _RING_NAME.fullmatch(name):
            raise CorruptData(f"shared-memory reference: {name[:80]!r} is not a ring name")
        try:
            descriptor = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise CorruptData(f"shared-memory reference: ring {name!r} cannot be opened ({exc.strerror})") from None
        try:
            memory = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(descriptor)
        address = np.frombuffer(memory, dtype=np.uint8).ctypes.data
        self._maps[name] = (memory, address, len(memory))
        return memory

    def locate(self, frames: list) -> list[tuple[int, str, int, int]] | None:
        """(frame index, ring name, offset, length) of each large frame when all lie in one mapped ring, else None."""
        located = []
        for index, frame in enumerate(frames):
            if isinstance(frame, bytes):
                continue
            view = np.frombuffer(frame, dtype=np.uint8)
            if view.nbytes < LARGE_FRAME:
                continue
            address = view.ctypes.data
            for name, (_, base, size) in self._maps.items():
                if base <= address and address + view.nbytes <= base + size:
                    located.append((index, name, address - base, view.nbytes))
                    break
            else:
                return None
        if not located or any(name != located[0][1] for _, name, _, _ in located):
            return None
        return located


class ReceiveRing:
    """The receiver's read-only view of a ring; unpacks reference frames into array views."""

    def __init__(self, path: str, on_release: Callable[[int], None],
                 maps: RingMaps | None = None, on_forward_release: Callable[[int], None] | None = None):
        self.directory, self.name = os.path.split(path)
        self.on_release = on_release
        self.on_forward_release = on_forward_release
        self.maps = maps or RingMaps()

    def unpack(self, frames: list) -> list:
        """Untrusted frames from the socket -> the original frames, large ones as read-only views of the ring.

        Each message's views hang off one array whose base is the mapping
        itself (so numpy does not collapse views past it); once the last of
        them is gone, ``on_release(offset)`` runs for a slot of this ring and
        ``on_forward_release(token)`` for a forward reference.
        """
        reference = bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        if reference[:len(TAG)] == FORWARD_TAG:
            return self._unpack_forwarded(reference[len(TAG):], frames)
        memory = self.maps.open(self.directory, self.name, trusted=True)
        body = reference[len(TAG):]
        if len(body) < _HEAD.size:
            raise CorruptData("shared-memory reference: truncated header")
        offset, length, count = _HEAD.unpack_from(body)
        if len(body) != _HEAD.size + count * _FRAME.size or offset + length > len(memory):
            raise CorruptData(f"shared-memory reference: slot {offset}+{length} or {count} frames out of bounds")
        slot = np.frombuffer(memory, dtype=np.uint8, count=length, offset=offset)
        weakref.finalize(slot, self.on_release, offset)
        return _place(slot, body, _HEAD.size, count, frames)

    def _unpack_forwarded(self, body: bytes, frames: list) -> list:
        if len(body) < _FORWARD_HEAD.size or self.on_forward_release is None:
            raise CorruptData("shared-memory reference: truncated or unexpected forward reference")
        token, count, name_length = _FORWARD_HEAD.unpack_from(body)
        start = _FORWARD_HEAD.size + name_length
        if len(body) != start + count * _FRAME.size:
            raise CorruptData(f"shared-memory reference: forward of {count} frames has {len(body)} bytes")
        name = body[_FORWARD_HEAD.size:start].decode("ascii", "replace")
        anchor = np.frombuffer(self.maps.open(self.directory, name), dtype=np.uint8)
        weakref.finalize(anchor, self.on_forward_release, token)
        return _place(anchor, body, start, count, frames)


def _place(memory: np.ndarray, body: bytes, position: int, count: int, frames: list) -> list:
    """frames[1:] with the ``count`` frames described at ``body[position:]`` replaced by views of ``memory``."""
    unpacked = list(frames[1:])
    for index in range(count):
        frame_index, start, size = _FRAME.unpack_from(body, position + index * _FRAME.size)
        if frame_index >= len(unpacked) or start + size > memory.shape[0]:
            raise CorruptData(f"shared-memory reference: frame {frame_index} at {start}+{size} out of bounds")
        unpacked[frame_index] = memory[start: start + size]
    return unpacked


def forward_reference(frames: list, located: list[tuple[int, str, int, int]], token: int) -> list:
    """Frames with the ``located`` ones (all in one ring) replaced by a forward reference frame."""
    name = located[0][1].encode("ascii")
    head = [FORWARD_TAG, _FORWARD_HEAD.pack(token, len(located), len(name)), name]
    packed = list(frames)
    for index, _, offset, length in located:
        head.append(_FRAME.pack(index, offset, length))
        packed[index] = b""
    return [b"".join(head)] + packed


def is_reference(frame) -> bool:
    """Whether a message's first frame is a ring reference (of a slot, or forwarded)."""
    data = frame.buffer if hasattr(frame, "buffer") else frame
    return len(data) >= len(TAG) and bytes(data[:len(TAG)]) in (TAG, FORWARD_TAG)
