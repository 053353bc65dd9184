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
from typing import Any, Callable

import numpy as np

from .batch import frame_buffer
from .errors import CorruptData

LARGE_FRAME = 64 << 10
"""Frames this large go into the ring; smaller ones travel inside the reference."""
SHM_THRESHOLD = LARGE_FRAME
"""Messages with at least this many bytes in large frames go through the ring: copying 64 KiB into it costs a
few microseconds, less than the socket's copy in and out of the kernel (and the receiver's buffer for it)."""
TAG = b"PPSHM\x00\x00\x01"
FORWARD_TAG = b"PPSHM\x00\x00\x02"
_TAGS = (TAG, FORWARD_TAG)
_HEAD = struct.Struct("<QQI")       # slot offset, slot length, frame count
_FRAME = struct.Struct("<IQQ")      # frame index, offset in slot (in the ring file when forwarded), length
_FORWARD_HEAD = struct.Struct("<QIH")  # token, frame count, ring file name length
_TOKEN = struct.Struct("<Q")           # the token at the start of _FORWARD_HEAD
_TOTAL = struct.Struct("<II")       # frames of the message, frames carried inline
_INLINE = struct.Struct("<II")      # frame index, length (the frame's bytes follow)
_INLINE_ALIGNMENT = 8
_MAX_FRAMES = 1 << 16
ALIGNMENT = 64
_RING_NAME = re.compile(r"r\d+\.\d+\.\d+\.\d+|a\d+\.\d+\.\d+")


def ring_name(node: int, worker: int, link: int, downstream_worker: int) -> str:
    """File name of the ring from ``worker`` of plan node ``node`` to ``downstream_worker`` on output ``link``."""
    return f"r{node}.{worker}.{link}.{downstream_worker}"


def arena_name(node: int, worker: int, chunk: int) -> str:
    """File name of chunk ``chunk`` of the arena of ``worker`` of plan node ``node``."""
    return f"a{node}.{worker}.{chunk}"


def _shared_file(path: str, capacity: int, reserve: bool = False) -> mmap.mmap:
    """A new file of ``capacity`` bytes mapped read-write and shared; ``reserve`` allocates its space now
    (OSError when /dev/shm is full, rather than SIGBUS on first write)."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if reserve:
            os.posix_fallocate(descriptor, 0, capacity)
        else:
            os.ftruncate(descriptor, capacity)
        return mmap.mmap(descriptor, capacity)
    finally:
        os.close(descriptor)


class SendRing:
    """The sender's side of a ring: allocates slots in order, frees them in any order."""

    def __init__(self, path: str, capacity: int, reserve: bool = False):
        self.capacity = capacity
        self.mapping = _shared_file(path, capacity, reserve)
        self.memory = np.frombuffer(self.mapping, dtype=np.uint8)
        self._head = 0   # logical positions, growing forever
        self._tail = 0
        self._slots: deque[list] = deque()   # [logical start, logical end, released]
        self._by_offset: dict[int, list] = {}

    def pack(self, frames: list) -> list | None:
        """The message as one reference frame, its large frames copied into a ring slot; None when the ring
        has no room now."""
        large = [(i, memoryview(f).cast("B")) for i, f in enumerate(frames)
                 if not isinstance(f, bytes) and memoryview(f).nbytes >= LARGE_FRAME]
        sizes = [(view.nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for _, view in large]
        offset = self._allocate(sum(sizes))
        if offset is None:
            return None
        head = [TAG, _HEAD.pack(offset, sum(sizes), len(large))]
        position = 0
        for (index, view), size in zip(large, sizes):
            self.memory[offset + position: offset + position + view.nbytes] = np.frombuffer(view, dtype=np.uint8)
            head.append(_FRAME.pack(index, position, view.nbytes))
            position += size
        return [_with_inline_frames(head, frames, {index for index, _ in large})]

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


class Arena:
    """Shared memory a stage writes its output into, so that its batches leave by reference (see above).

    Chunks of ``chunk_bytes`` (or one request's size) up to ``limit_bytes`` in
    all, each a ring; ``allocate`` returns None when none has room. Releases
    may come from any thread (the last view of an array can die in pyzmq's
    garbage-collector thread), so they are queued and applied by ``allocate``.
    """

    def __init__(self, directory: str, node: int, worker: int, maps: "RingMaps",
                 chunk_bytes: int, limit_bytes: int):
        self.directory, self.node, self.worker = directory, node, worker
        self.maps = maps
        self.chunk_bytes, self.limit_bytes = chunk_bytes, limit_bytes
        self.rings: list[SendRing] = []
        self._freed: deque[tuple[int, int]] = deque()   # (chunk, offset), appended by finalizers
        self._watch = Watch(self._freed.append)
        self.failed = False

    @property
    def size(self) -> int:
        return sum(ring.capacity for ring in self.rings)

    def allocate(self, shape: tuple[int, ...], dtype) -> np.ndarray | None:
        """A writable array in shared memory, or None when the arena has no room for it now."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0:
            return None
        size = (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.collect()
        for chunk, ring in enumerate(self.rings):
            if size <= ring.capacity:
                offset = ring._allocate(size)
                if offset is not None:
                    return self._array(chunk, offset, nbytes, shape, dtype)
        capacity = max(self.chunk_bytes, size)
        if self.failed or self.size + capacity > self.limit_bytes:
            return None
        name = arena_name(self.node, self.worker, len(self.rings))
        try:
            ring = SendRing(os.path.join(self.directory, name), capacity, reserve=True)
        except OSError:
            self.failed = True   # no room in /dev/shm: private memory from now on
            return None
        self.rings.append(ring)
        self.maps.add(name, ring.mapping)
        offset = ring._allocate(size)
        return None if offset is None else self._array(len(self.rings) - 1, offset, nbytes, shape, dtype)

    def _array(self, chunk: int, offset: int, nbytes: int, shape, dtype) -> np.ndarray:
        slot = np.frombuffer(self.rings[chunk].mapping, dtype=np.uint8, count=nbytes, offset=offset)
        self._watch.watch(slot, (chunk, offset))
        return slot.view(dtype).reshape(shape)   # views of ``slot``: it is freed when the last one goes

    def collect(self) -> None:
        """Free the slots whose arrays are gone."""
        while self._freed:
            chunk, offset = self._freed.popleft()
            self.rings[chunk].release(offset)

    @property
    def used(self) -> int:
        self.collect()
        return sum(ring.used for ring in self.rings)


class RingMaps:
    """The ring files one worker has mapped read-only, by name; finds which one a buffer lies in."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, int, int]] = {}   # name -> mapping, address, size

    def add(self, name: str, memory: mmap.mmap) -> None:
        """A mapping this worker made itself (its arena), so ``locate`` finds arrays in it."""
        self._maps[name] = (memory, np.frombuffer(memory, dtype=np.uint8).ctypes.data, len(memory))

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
        """(frame index, ring name, offset, length) of each large frame when all lie in one mapped ring, else None.

        ``frames`` as ``Batch.to_frames`` makes them: bytes, or 1-D byte views (len() is their size).
        """
        located = []
        ring = None
        for index, frame in enumerate(frames):
            length = len(frame)
            if length < LARGE_FRAME or isinstance(frame, bytes):
                continue
            address = np.frombuffer(frame, dtype=np.uint8).__array_interface__["data"][0]  # ctypes.data: slower
            if ring is None:
                for name, (_, base, size) in self._maps.items():
                    if base <= address < base + size:
                        ring = name, base, size
                        break
                else:
                    return None
            name, base, size = ring
            if not base <= address or address + length > base + size:
                return None   # outside the ring of the first large frame
            located.append((index, name, address - base, length))
        return located or None


class ReceiveRing:
    """The receiver's read-only view of a ring; unpacks reference frames into array views."""

    def __init__(self, path: str, on_release: Callable[[int], None],
                 maps: RingMaps | None = None, on_forward_release: Callable[[int], None] | None = None):
        self.directory, self.name = os.path.split(path)
        self.on_release = on_release
        self.on_forward_release = on_forward_release
        self.maps = maps or RingMaps()
        self._slots = Watch(on_release)
        self._forwards = Watch(on_forward_release) if on_forward_release is not None else None

    def unpack(self, frames: list) -> list:
        """An untrusted reference message from the socket -> the original frames, large ones as read-only
        views of the ring, small ones as views of the reference frame.

        Each message's views hang off one array whose base is the mapping
        itself (so numpy does not collapse views past it); once the last of
        them is gone, ``on_release(offset)`` runs for a slot of this ring and
        ``on_forward_release(token)`` for a forward reference.
        """
        if len(frames) != 1:
            raise CorruptData(f"shared-memory reference: {len(frames)} frames, a reference is one")
        reference = frame_buffer(frames[0])
        if reference[:len(TAG)] == FORWARD_TAG:
            return self._unpack_forwarded(reference, len(TAG))
        memory = self.maps.open(self.directory, self.name, trusted=True)
        position = len(TAG)
        if len(reference) < position + _HEAD.size:
            raise CorruptData("shared-memory reference: truncated header")
        offset, length, count = _HEAD.unpack_from(reference, position)
        position += _HEAD.size
        if offset + length > len(memory):
            raise CorruptData(f"shared-memory reference: slot {offset}+{length} out of bounds")
        slot = np.frombuffer(memory, dtype=np.uint8, count=length, offset=offset)
        self._slots.watch(slot, offset)
        return _place(slot, reference, position, count)

    def _unpack_forwarded(self, reference: memoryview, position: int) -> list:
        if len(reference) < position + _FORWARD_HEAD.size or self._forwards is None:
            raise CorruptData("shared-memory reference: truncated or unexpected forward reference")
        token, count, name_length = _FORWARD_HEAD.unpack_from(reference, position)
        position += _FORWARD_HEAD.size
        if len(reference) < position + name_length:
            raise CorruptData(f"shared-memory reference: forward names a ring of {name_length} bytes beyond its end")
        name = bytes(reference[position:position + name_length]).decode("ascii", "replace")
        anchor = np.frombuffer(self.maps.open(self.directory, name), dtype=np.uint8)
        self._forwards.watch(anchor, token)
        return _place(anchor, reference, position + name_length, count)


class Watch:
    """Calls ``on_gone(value)`` once the array watched with it has been collected (from whichever thread drops
    its last view). A weak reference kept in a dict: ``weakref.finalize`` costs several microseconds more."""

    def __init__(self, on_gone: Callable[[Any], None]):
        self.on_gone = on_gone
        self._watched: dict[int, tuple[weakref.ref, Any]] = {}   # by id: a weak reference hashes as its array

    def watch(self, array: np.ndarray, value: Any) -> None:
        reference = weakref.ref(array, self._gone)
        self._watched[id(reference)] = (reference, value)

    def _gone(self, reference: weakref.ref) -> None:
        self.on_gone(self._watched.pop(id(reference))[1])


def _with_inline_frames(head: list, frames: list, moved: set[int]) -> bytes:
    """One reference frame: ``head`` (tag, slot, descriptors), then every frame not ``moved`` to shared
    memory, each at an 8-byte aligned offset (arrays in batch headers keep their alignment)."""
    parts = head + [_TOTAL.pack(len(frames), len(frames) - len(moved))]
    position = sum(map(len, parts))
    for index, frame in enumerate(frames):
        if index in moved:
            continue
        padding = -position % _INLINE_ALIGNMENT
        length = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        parts += [bytes(padding), _INLINE.pack(index, length), frame]
        position += padding + _INLINE.size + length
    return b"".join(parts)


def _place(memory: np.ndarray, reference: memoryview, position: int, count: int) -> list:
    """The frames a reference frame describes from ``position`` on: ``count`` in ``memory``, the rest inline."""
    end = position + count * _FRAME.size + _TOTAL.size
    if len(reference) < end:
        raise CorruptData(f"shared-memory reference: {count} frame descriptors beyond its {len(reference)} bytes")
    total, inline = _TOTAL.unpack_from(reference, end - _TOTAL.size)
    if total > _MAX_FRAMES or count + inline != total:
        raise CorruptData(f"shared-memory reference: {total} frames, {count} shared and {inline} inline")
    unpacked: list = [None] * total
    for index in range(count):
        frame_index, start, size = _FRAME.unpack_from(reference, position + index * _FRAME.size)
        if frame_index >= total or unpacked[frame_index] is not None or start + size > memory.shape[0]:
            raise CorruptData(f"shared-memory reference: frame {frame_index} at {start}+{size} out of bounds")
        unpacked[frame_index] = memory[start: start + size]
    position = end
    for _ in range(inline):
        position += -position % _INLINE_ALIGNMENT
        if len(reference) < position + _INLINE.size:
            raise CorruptData("shared-memory reference: truncated inline frame")
        frame_index, size = _INLINE.unpack_from(reference, position)
        position += _INLINE.size
        if frame_index >= total or unpacked[frame_index] is not None or position + size > len(reference):
            raise CorruptData(f"shared-memory reference: inline frame {frame_index} of {size} bytes out of bounds")
        unpacked[frame_index] = reference[position:position + size]
        position += size
    if position != len(reference):
        raise CorruptData(f"shared-memory reference: {len(reference) - position} bytes left over")
    return unpacked


def forward_reference(frames: list, located: list[tuple[int, str, int, int]], token: int) -> list:
    """The message as one forward reference frame: the ``located`` frames (all in one ring) by offset."""
    name = located[0][1].encode("ascii")
    head = [FORWARD_TAG, _FORWARD_HEAD.pack(token, len(located), len(name)), name]
    for index, _, offset, length in located:
        head.append(_FRAME.pack(index, offset, length))
    return [_with_inline_frames(head, frames, {index for index, _, _, _ in located})]


def is_forward(reference: memoryview) -> bool:
    """Whether a (checked, unpacked) reference frame is a forward reference."""
    return reference[:len(FORWARD_TAG)] == FORWARD_TAG


def reforward(reference: memoryview, token: int) -> bytes:
    """A forward reference received, sent on under this worker's ``token``: same ring, offsets and inline
    frames (a pass-through stage's unchanged batch needs no new reference)."""
    start = len(FORWARD_TAG)
    return b"".join((reference[:start], _TOKEN.pack(token), reference[start + _TOKEN.size:]))


def is_reference(frame) -> bool:
    """Whether a message's first frame is a ring reference (of a slot, or forwarded)."""
    data = frame_buffer(frame)
    return data[:len(TAG)] in _TAGS
