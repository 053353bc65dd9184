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
"""
from __future__ import annotations

import mmap
import os
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
_HEAD = struct.Struct("<QQI")       # slot offset, slot length, frame count
_FRAME = struct.Struct("<IQQ")      # frame index, offset in slot, length
ALIGNMENT = 64


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


class ReceiveRing:
    """The receiver's read-only view of a ring; unpacks reference frames into array views."""

    def __init__(self, path: str, on_release: Callable[[int], None]):
        self.path = path
        self.on_release = on_release
        self._memory: mmap.mmap | None = None

    def unpack(self, frames: list) -> list:
        """Untrusted frames from the socket -> the original frames, large ones as read-only views of the ring.

        Each slot is one array whose base is the mapping itself (so numpy does
        not collapse views past it); ``on_release(offset)`` runs when the last
        array viewing the slot is gone.
        """
        reference = bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        if self._memory is None:
            descriptor = os.open(self.path, os.O_RDONLY)
            try:
                self._memory = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(descriptor)
        body = reference[len(TAG):]
        if len(body) < _HEAD.size:
            raise CorruptData("shared-memory reference: truncated header")
        offset, length, count = _HEAD.unpack_from(body)
        if len(body) != _HEAD.size + count * _FRAME.size or offset + length > len(self._memory):
            raise CorruptData(f"shared-memory reference: slot {offset}+{length} or {count} frames out of bounds")
        slot = np.frombuffer(self._memory, dtype=np.uint8, count=length, offset=offset)
        weakref.finalize(slot, self.on_release, offset)
        unpacked = list(frames[1:])
        for index in range(count):
            frame_index, start, size = _FRAME.unpack_from(body, _HEAD.size + index * _FRAME.size)
            if frame_index >= len(unpacked) or start + size > length:
                raise CorruptData(f"shared-memory reference: frame {frame_index} at {start}+{size} out of bounds")
            unpacked[frame_index] = slot[start: start + size]
        return unpacked


def is_reference(frame) -> bool:
    data = frame.buffer if hasattr(frame, "buffer") else frame
    return len(data) >= len(TAG) and bytes(data[:len(TAG)]) == TAG
