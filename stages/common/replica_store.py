"""The replica on disk: page image, per-page digests, manifest and journal.

A replica directory always holds exactly one committed checkpoint (epoch)::

    DIR/manifest.json  format, version, page size, regions, epoch, digests
    DIR/pages.img      page number p at byte p * page_size (a sparse file)
    DIR/digests.u64    the 64-bit digest of every page of pages.img (uint64 LE)
    DIR/journal        non-empty only while an epoch is being applied
    DIR/lock           locked (open file description lock) by the one writer

``ReplicaStore.commit`` applies one verified epoch atomically (the first
commit into an empty replica needs no journal: until its manifest exists the
replica is simply empty). The journal is
a redo log of the epoch's *encodings* (FULL pages, or DELTA runs, which carry
the new bytes themselves, so applying them twice gives the same page): the
epoch's page numbers, digests, encodings and the new manifest, checksummed
(fsync). Then the encodings are applied onto the image and the digests
written (fsync), manifest.json is replaced atomically (fsync of the directory)
and the journal emptied. Opening a store replays a complete journal and
discards an incomplete one, so a receiver killed at any moment restarts at
exactly one committed epoch. Journaling encodings rather than pages keeps
the journal a few percent of the page data for delta epochs.
With ``fsync=False`` the order is the same but a power loss may lose recent
epochs (a killed process loses nothing: the page cache survives it).
With ``settle_later`` (replica-sink's default ``settle=idle``) the durable
journal is the commit point: ``commit`` returns after applying the epoch and
replacing the manifest unflushed, and ``settle`` (called before the next
commit, or while the sink is idle) flushes image, digests and manifest and
empties the journal: one flush on the acknowledgement's path instead of five,
with the same guarantee (a crash before ``settle`` leaves a complete journal,
replayed on open; readers apply it too).
A commit creates and deletes no file (journal and manifest files stay open
between commits): on ext4 that halves the fixed cost of a small commit.
The format is specified in docs/FORMAT.md (section replica).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import xxhash

from pipeline.batch import PageKind
from pipeline.errors import ConfigError, ReplicaError
from stages.codecs import Encoded, PageCodec, get_codec
from stages.common.layout import Layout, Region
from stages.common.pages import combine_digests, digest_pages

FORMAT_NAME = "pagepipe-replica"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_TEMPORARY = MANIFEST + ".tmp"
IMAGE = "pages.img"
DIGESTS = "digests.u64"
JOURNAL = "journal"
LOCK = "lock"
JOURNAL_MAGIC = b"PPJRNL\x00\x01"
JOURNAL_END = b"PPJEND\x00\x01"
_JOURNAL_HEAD = struct.Struct("<8sI")        # magic, header length
_JOURNAL_TAIL = struct.Struct("<Q8s")        # xxh3-64 of everything before, end magic
MAX_JOURNAL_HEADER = 1 << 20
_MASK64 = 0xFFFFFFFFFFFFFFFF
DEFAULT_MAX_PAGES = 1 << 26   # 256 GiB of 4 KiB pages; bounds what an untrusted layout can make us allocate


class ReplicaLocked(ReplicaError):
    """Another writer (a running replica-sink) holds the replica's lock."""


_FLOCK = struct.Struct("hh4xqqi4x")     # struct flock on 64-bit Linux: type, whence, start, len, pid
_HELD_LOCKS: set[int] = set()           # lock descriptors of this process, closed in forked children
_HELD_LOCKS_GUARD = threading.Lock()


def _close_locks_in_child() -> None:
    """A forked child must not keep the parent's replica locked: close its copies of the lock descriptors
    (the lock stays with the parent's copy, and goes when the parent's process ends)."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


class ReplicaLock:
    """The one-writer lock of a replica directory: an open-file-description lock (``F_OFD_SETLK``) on
    ``DIR/lock``, exclusive, taken without waiting.

    Unlike a POSIX record lock it conflicts between two openers in one process, and closing another
    descriptor of the file does not drop it; unlike ``flock`` nothing outlives its process: the
    descriptor is close-on-exec and closed in forked children. Readers take no lock.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path) / LOCK
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ReplicaError(f"replica {path}: cannot open the lock file {self.path} "
                               f"({exc.strerror or exc})") from None
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ReplicaLocked(f"replica {path}: another receiver is writing it (its lock file {self.path} "
                                    f"is held); one replica-sink per replica directory") from None
            raise ReplicaError(f"replica {path}: cannot lock {self.path} ({exc.strerror or exc})") from None
        with _HELD_LOCKS_GUARD:
            _HELD_LOCKS.add(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            with _HELD_LOCKS_GUARD:
                _HELD_LOCKS.discard(self._fd)
            os.close(self._fd)
            self._fd = None


def replica_locked(path: str | os.PathLike) -> bool:
    """Whether a writer holds the replica's lock now (asked with F_OFD_GETLK: takes nothing)."""
    try:
        fd = os.open(Path(path) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    finally:
        os.close(fd)
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def disk_free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still allocate on the file system of ``path`` (None if unknown)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def replica_layout(page_size: Any, regions: Any, *, max_pages: int) -> Layout:
    """``Layout.from_untrusted`` for a replica (from the wire or a manifest): ReplicaError saying what is wrong."""
    try:
        return Layout.from_untrusted(page_size, regions, max_pages=max_pages)
    except ValueError as exc:
        raise ReplicaError(f"layout: {exc}") from None


def whole_pages(pages: np.ndarray, zero: np.ndarray | None = None) -> Encoded:
    """Raw pages as an encoding (kind FULL, or ZERO where ``zero`` is True), valid in every run format."""
    page_size = pages.shape[1]
    kinds = np.full(pages.shape[0], PageKind.FULL, dtype=np.uint8)
    if zero is not None and zero.any():
        kinds[zero] = PageKind.ZERO
        pages = pages[~zero]
    sizes = np.where(kinds == PageKind.FULL, page_size, 0).astype(np.uint64)
    offsets = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(sizes, dtype=np.uint64)])
    payload = np.ascontiguousarray(pages).reshape(-1)
    return Encoded(payload=payload, offsets=offsets, kinds=kinds, codec="native", raw_size=int(payload.size))


def clear_replica(path: str | os.PathLike) -> None:
    """Delete a replica's files (not the directory), leaving it empty."""
    for name in (MANIFEST, IMAGE, DIGESTS, JOURNAL, MANIFEST_TEMPORARY):
        try:
            (Path(path) / name).unlink(missing_ok=True)
        except OSError as exc:
            raise ReplicaError(f"replica {path}: cannot delete {name} ({exc.strerror or exc})") from None


def ensure_replica_directory(path: str | os.PathLike) -> Path:
    """The replica directory, created if missing; ReplicaError naming the path if it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReplicaError(f"replica {path}: cannot create directory ({exc.strerror or exc})") from None
    if not path.is_dir():
        raise ReplicaError(f"replica {path}: not a directory")
    return path


def check_replica_directory(path: str | os.PathLike, force: bool = False) -> None:
    """ConfigError for a non-empty directory that is not a replica, unless ``force``: what marks a
    replica is its manifest (once an epoch is committed) or its lock file (from the moment a
    replica-sink opened it), so a replica-sink never scatters its files among someone else's."""
    directory = Path(path)
    if force or not directory.is_dir():
        return
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        raise ReplicaError(f"replica {path}: cannot list the directory ({exc.strerror or exc})") from None
    if entries and MANIFEST not in entries and LOCK not in entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"replica-sink: path={path} holds {len(entries)} other file(s) ({shown}) and is not "
                          f"a replica (no {MANIFEST} or {LOCK} file); give a new or empty directory, or add "
                          f"force=true to keep the replica's files among them")


def _hex(value: int) -> str:
    return f"0x{value & _MASK64:016x}"


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buffers: list) -> None:
    for buffer in buffers:
        view = memoryview(buffer)
        if view.nbytes == 0:
            continue
        view = view.cast("B")
        while view:
            written = os.write(fd, view)
            view = view[written:]


def _load_libc_function(name: str, argtypes: list) -> Any:
    """A libc function (Linux) returning int and setting errno, or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                                ctypes.c_uint])
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_FALLOCATE = _load_libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


@lru_cache(maxsize=8)
def zero_page_digest(page_size: int) -> int:
    """The page digest of an all-zero page."""
    return int(digest_pages(np.zeros((1, page_size), dtype=np.uint8))[0])


def _page_runs(page_numbers: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in sorted, unique ``page_numbers``."""
    breaks = np.flatnonzero(np.diff(page_numbers) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [page_numbers.shape[0]]])
    return [(int(page_numbers[a]), int(b - a)) for a, b in zip(starts, stops)]


class _JournalFile:
    """``DIR/journal``, kept open between commits: rewritten from its start for each commit and
    truncated to nothing once the commit is done (an empty journal is no commit in progress), so
    a commit creates and deletes no file."""

    def __init__(self, path: Path, fsync: bool):
        self.path = path
        self.fsync = fsync
        self._fd: int | None = None

    def write(self, parts: list) -> None:
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            self.close()   # deleted behind our back: a journal nobody would find is no journal
        created = self._fd is None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        _write_all(self._fd, parts)
        if self.fsync:
            os.fsync(self._fd)
            if created:
                _fsync_directory(self.path.parent)

    def clear(self) -> None:
        """The commit is done: empty the journal (delete it if another store wrote it)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        else:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _ManifestFile:
    """Replaces ``DIR/manifest.json`` atomically.

    The new text goes into ``manifest.json.tmp``, which then trades places with
    ``manifest.json`` in one atomic step (renameat2 RENAME_EXCHANGE); both files stay
    open for the next commit. A rename over an existing file would cost more: ext4 flushes
    the renamed file's data first (about 0.1 ms per commit). Where the exchange is not
    available: write a new ``manifest.json.tmp`` and rename it over (os.replace).
    """

    def __init__(self, directory: Path, fsync: bool):
        self.path = directory / MANIFEST
        self.temporary = directory / MANIFEST_TEMPORARY
        self.fsync = fsync
        self._exchange_works = _RENAMEAT2 is not None
        self._spare: int | None = None   # the file named manifest.json.tmp
        self._live: int | None = None    # the file named manifest.json

    def replace(self, text: str, sync: bool | None = None) -> None:
        """Replace the manifest; ``sync`` (default: the store's fsync) makes it durable now, else ``sync()`` later."""
        sync = self.fsync if sync is None else sync
        data = text.encode()
        if not (self._spare is not None and self._exchanged(data, sync)):
            self._replaced(data, sync)
        if sync:
            _fsync_directory(self.path.parent)

    def sync(self) -> None:
        """Make the current manifest and its name durable (after a ``replace(sync=False)``)."""
        if self._live is not None:
            os.fsync(self._live)
        else:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(self.path.parent)

    def _exchanged(self, data: bytes, sync: bool) -> bool:
        """Write ``data`` into the spare file and swap it in; False (nothing replaced) if that cannot be done."""
        spare = self._spare
        if spare is None:
            return False
        try:
            if os.fstat(spare).st_ino != os.stat(self.temporary).st_ino:
                return False   # replaced or deleted behind our back: not our file any more
        except FileNotFoundError:
            return False
        os.pwrite(spare, data, 0)
        os.ftruncate(spare, len(data))
        if sync:
            os.fsync(spare)
        if _RENAMEAT2(_AT_FDCWD, bytes(self.temporary), _AT_FDCWD, bytes(self.path), _RENAME_EXCHANGE) != 0:
            error = ctypes.get_errno()
            if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                self._exchange_works = False   # this file system cannot: rename from now on
                return False
            raise OSError(error, os.strerror(error), str(self.temporary))
        written = self._spare   # now manifest.json; manifest.json.tmp is the previous manifest
        self._spare = self._live if self._live is not None else os.open(self.temporary, os.O_RDWR)
        self._live = written
        return True

    def _replaced(self, data: bytes, sync: bool) -> None:
        """Write a new manifest.json.tmp and rename it over manifest.json; then prepare a spare file."""
        self.close()
        with open(self.temporary, "wb") as temporary:
            temporary.write(data)
            temporary.flush()
            if sync:
                os.fsync(temporary.fileno())
        os.replace(self.temporary, self.path)
        if self._exchange_works:
            self._spare = os.open(self.temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def close(self) -> None:
        for fd in (self._spare, self._live):
            if fd is not None:
                os.close(fd)
        self._spare = self._live = None


class ReplicaStore:
    """An open replica directory; the only code that writes it.

    ``epoch`` is 0 while the store is empty (no layout, nothing committed).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, max_pages: int = DEFAULT_MAX_PAGES,
                 writable: bool = True, lock: ReplicaLock | None = None, settle_later: bool = False):
        """Open a replica; a writable store holds its lock (``lock``, or one it takes and releases on close):
        ReplicaLocked if another writer holds it. Every failure is a ReplicaError naming the path."""
        self.path = Path(path)
        self.fsync = fsync
        self.settle_later = settle_later
        """With fsync, a commit returns once its journal is durable (the commit point: a complete journal is
        replayed on open) and leaves the other flushes (image, digests, manifest) and emptying the journal to
        ``settle``, which the next commit, ``sync`` and ``close`` call first (replica-sink calls it while idle)."""
        self.unsettled = False
        self.max_pages = max_pages
        self.writable = writable
        self.layout: Layout | None = None
        self.epoch = 0
        self.manifest: dict[str, Any] = {}
        self._image: np.memmap | None = None
        self._digests: np.memmap | None = None
        self._journal = _JournalFile(self.path / JOURNAL, fsync)
        self._manifest_file = _ManifestFile(self.path, fsync)
        self._lock, self._owns_lock = lock, False
        if writable:
            ensure_replica_directory(self.path)
            if lock is None:
                self._lock, self._owns_lock = ReplicaLock(self.path), True
        try:
            self.recovered_journal = self._recover_journal() if writable else "none"
            """What opening did with an interrupted commit: none, replayed or discarded."""
            if (self.path / MANIFEST).exists():
                self._load_manifest()
        except (OSError, ValueError) as exc:        # ValueError: numpy cannot map a file (too short, too big)
            self.close()
            raise ReplicaError(f"replica {self.path}: cannot open ({getattr(exc, 'strerror', None) or exc}"
                               f"{': ' + str(getattr(exc, 'filename')) if getattr(exc, 'filename', None) else ''})") from None
        except ReplicaError:
            self.close()
            raise

    # ---- reading -------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return self.epoch == 0

    def read_pages(self, page_numbers: np.ndarray, page_size: int) -> np.ndarray:
        """Copies of the committed contents of these pages (zeros beyond the image or for another page size)."""
        if self._image is None or self._image.shape[1] != page_size:
            return np.zeros((page_numbers.shape[0], page_size), dtype=np.uint8)
        image = self._image.view(np.ndarray)
        present = page_numbers < image.shape[0]
        if present.all():
            return image[page_numbers.astype(np.intp)]
        out = np.zeros((page_numbers.shape[0], page_size), dtype=np.uint8)
        out[present] = image[page_numbers[present].astype(np.intp)]
        return out

    def decoded_digests(self, encoding: Encoded, page_numbers: np.ndarray, page_size: int) -> np.ndarray:
        """Digests of the pages ``encoding`` (plain run format) makes from the committed pages
        ``page_numbers`` (zero pages beyond the image or for another page size), writing nothing.

        Raises CorruptData (the codec's message) if the encoding does not decode, ConfigError
        if its codec is not a run format.
        """
        if self._image is None or self._image.shape[1] != page_size:
            previous, rows = np.empty((0, page_size), dtype=np.uint8), np.full(page_numbers.shape[0], -1)
        else:
            previous = self._image.view(np.ndarray)
            rows = page_numbers.astype(np.int64)
            rows[page_numbers >= previous.shape[0]] = -1
        return run_format(encoding.codec).digest_decoded(encoding, previous, rows)

    def pending_journal(self) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[Encoded]] | None:
        """A complete journal not yet applied (manifest, page numbers, digests, encodings), or None.

        Only a read-only store sees one: a writable store replays it when it opens.
        """
        try:
            return _read_journal(self.path / JOURNAL) if (self.path / JOURNAL).exists() else None
        except (ReplicaError, OSError):
            return None

    def image_digest(self) -> int:
        """Order-independent digest of every page of the layout, from the digest file."""
        if self._digests is None or self.layout is None:
            return 0
        page_numbers = self.layout.page_numbers()
        return combine_digests(page_numbers, np.asarray(self._digests[page_numbers.astype(np.intp)]))

    # ---- writing -------------------------------------------------------
    def commit(self, epoch: int, layout: Layout, page_numbers: np.ndarray, encodings: Sequence[Encoded],
               digests: np.ndarray, epoch_digest: int, **extra: Any) -> None:
        """Apply one verified epoch atomically (journal, apply, manifest, drop journal).

        ``encodings`` are the epoch's pages in a plain run format (no entropy layer; FULL,
        ZERO, DELTA or UNCHANGED), one after another in the order of ``page_numbers``
        (uint64, unique, inside ``layout``); ``digests`` are the digests of the pages they
        produce and ``epoch_digest`` is ``combine_digests(page_numbers, digests)``, both
        verified by the caller (``decoded_digests``), so the encodings are known to decode
        and are applied in one pass. ``extra`` goes into the manifest.
        """
        self.settle()
        try:
            self._commit(epoch, layout, page_numbers, encodings, digests, epoch_digest, extra)
        except (OSError, ValueError) as exc:    # anything a full disk or a failed mapping raises
            raise ReplicaError(f"replica {self.path}: cannot commit epoch {epoch} "
                               f"({getattr(exc, 'strerror', None) or exc})") from None

    def _commit(self, epoch: int, layout: Layout, page_numbers: np.ndarray, encodings: Sequence[Encoded],
                digests: np.ndarray, epoch_digest: int, extra: dict[str, Any]) -> None:
        if epoch < 1:   # 0 marks the empty replica: the next commit would discard this one's image
            raise ReplicaError(f"replica {self.path}: cannot commit epoch {epoch}: checkpoints are numbered from 1")
        if self.is_empty or self.layout is None or layout.page_size != self.layout.page_size:
            self._discard_image()   # leftovers of an interrupted first commit, or another page size
        self._ensure_files(layout)
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, **layout.as_json(),
            "total_pages": layout.total_pages, "epoch": int(epoch), "epoch_digest": _hex(epoch_digest),
            "image_digest": _hex(self._next_image_digest(layout, page_numbers, digests, epoch_digest)),
            "committed_at": time.time(), **extra,
        }
        journaled = not self.is_empty   # the first commit has no previous epoch to protect
        encodings = list(encodings)
        if journaled:
            self._write_journal(manifest, page_numbers, encodings, digests)
        self._apply(manifest, layout, page_numbers, encodings, digests, journaled, prechecked=True)

    def _next_image_digest(self, layout: Layout, page_numbers: np.ndarray, digests: np.ndarray,
                           epoch_digest: int) -> int:
        """The image digest once these pages are applied: updated by difference (combine_digests is a
        sum mod 2**64, and ``epoch_digest`` that sum over the new pages) while the layout stays,
        recomputed over the whole layout when it changes."""
        rows = page_numbers.astype(np.intp)
        if layout == self.layout and "image_digest" in self.manifest:
            previous = int(str(self.manifest["image_digest"]), 16)
            removed = combine_digests(page_numbers, self._mapped()[1].view(np.ndarray)[rows])
            return (previous - removed + epoch_digest) & _MASK64
        layout_pages = layout.page_numbers()
        new_digests = np.array(self._mapped()[1][layout_pages.astype(np.intp)])
        new_digests[np.searchsorted(layout_pages, page_numbers)] = digests
        return combine_digests(layout_pages, new_digests)

    def settle(self) -> None:
        """Finish a commit left unsettled (``settle_later``): flush image, digests and manifest, empty the journal."""
        if not self.unsettled:
            return
        image, digest_file = self._mapped()
        try:
            image.flush()
            digest_file.flush()
            self._manifest_file.sync()
            self._journal.clear()
        except OSError as exc:
            raise ReplicaError(f"replica {self.path}: cannot settle epoch {self.epoch} ({exc.strerror})") from None
        self.unsettled = False

    def sync(self) -> None:
        """Make the committed epoch durable now (what ``fsync=True`` does at every commit): image, digests,
        manifest and the directory reach the disk."""
        self.settle()
        try:
            if self._image is not None and self._digests is not None:
                self._image.flush()
                self._digests.flush()
            for name in (IMAGE, DIGESTS, MANIFEST):
                if (self.path / name).exists():
                    fd = os.open(self.path / name, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            _fsync_directory(self.path)
        except OSError as exc:
            raise ReplicaError(f"replica {self.path}: cannot make it durable ({exc.strerror or exc})") from None

    def check_room(self, layout: Layout) -> None:
        """ReplicaError unless ``layout`` fits: at most ``max_pages`` pages, and the bytes its image and
        digest files would grow by fit in the file system's free space (checked before allocating)."""
        if layout.total_pages > self.max_pages:
            raise ReplicaError(f"replica {self.path}: layout of {layout.total_pages} pages exceeds "
                               f"max-pages={self.max_pages}")
        have_image = self._image.shape[0] if self._image is not None and self._image.shape[1] == layout.page_size else 0
        growth = max(layout.total_pages - have_image, 0) * (layout.page_size + 8)
        free = disk_free_bytes(self.path)
        if free is not None and growth > free:
            raise ReplicaError(f"replica {self.path}: layout of {layout.total_pages} pages needs {growth} more bytes, "
                               f"the disk has {free} free")

    def close(self) -> None:
        if self.unsettled:
            self.settle()
        self._image = self._digests = None
        self._journal.close()
        self._manifest_file.close()
        if self._owns_lock and self._lock is not None:
            self._lock.release()
        self._lock = None

    # ---- internals -----------------------------------------------------
    def _discard_image(self) -> None:
        self._image = self._digests = None
        for name in (IMAGE, DIGESTS):
            (self.path / name).unlink(missing_ok=True)

    def _ensure_files(self, layout: Layout) -> None:
        """Grow the image and digest files (sparse) to cover the layout, and map them."""
        total = max(layout.total_pages, 1)
        if self._image is not None and self._image.shape[0] >= total:
            return
        self.check_room(layout)
        zero_digest = zero_page_digest(layout.page_size)
        image_path, digest_path = self.path / IMAGE, self.path / DIGESTS
        old_pages = os.path.getsize(digest_path) // 8 if digest_path.exists() else 0
        try:
            with open(image_path, "ab") as image_file:
                if os.fstat(image_file.fileno()).st_size < total * layout.page_size:
                    image_file.truncate(total * layout.page_size)
            with open(digest_path, "ab") as digest_file:
                if old_pages < total:
                    digest_file.truncate(old_pages * 8)
                    np.full(total - old_pages, zero_digest, dtype="<u8").tofile(digest_file)
        except OSError as exc:
            raise ReplicaError(f"replica {self.path}: cannot grow the image ({exc.strerror})") from None
        try:
            self._map(layout.page_size)
        except (OSError, ValueError) as exc:
            raise ReplicaError(f"replica {self.path}: cannot map the image ({getattr(exc, 'strerror', None) or exc})") from None

    def _mapped(self) -> tuple[np.memmap, np.memmap]:
        """The image and digest files, mapped (``_ensure_files`` or opening an existing replica maps them)."""
        if self._image is None or self._digests is None:
            raise ReplicaError(f"replica {self.path}: its files are not mapped")
        return self._image, self._digests

    def _map(self, page_size: int) -> None:
        image_size = os.path.getsize(self.path / IMAGE)
        mode: Literal["r+", "r"] = "r+" if self.writable else "r"
        self._image = np.memmap(self.path / IMAGE, dtype=np.uint8, mode=mode,
                                shape=(image_size // page_size, page_size))
        self._digests = np.memmap(self.path / DIGESTS, dtype="<u8", mode=mode)

    def _write_journal(self, manifest: dict[str, Any], page_numbers: np.ndarray, encodings: list[Encoded],
                       digests: np.ndarray) -> None:
        header = json.dumps({"manifest": manifest, "count": int(page_numbers.shape[0]),
                             "encodings": [{"codec": e.codec, "pages": int(e.kinds.shape[0]),
                                            "bytes": int(e.payload.shape[0])} for e in encodings]}).encode()
        body: list[bytes | np.ndarray] = [_JOURNAL_HEAD.pack(JOURNAL_MAGIC, len(header)), header,
                np.ascontiguousarray(page_numbers, dtype="<u8"), np.ascontiguousarray(digests, dtype="<u8")]
        for encoding in encodings:
            body += [np.ascontiguousarray(encoding.kinds, dtype=np.uint8),
                     np.ascontiguousarray(encoding.offsets, dtype="<u8"),
                     np.ascontiguousarray(encoding.payload, dtype=np.uint8)]
        hasher = xxhash.xxh3_64()
        for part in body:
            hasher.update(part if isinstance(part, bytes) else part.data)
        body.append(_JOURNAL_TAIL.pack(hasher.intdigest(), JOURNAL_END))
        try:
            self._journal.write(body)
        except OSError as exc:
            raise ReplicaError(f"replica {self.path}: cannot write the journal ({exc.strerror})") from None

    def _apply(self, manifest: dict[str, Any], layout: Layout, page_numbers: np.ndarray,
               encodings: list[Encoded], digests: np.ndarray, journaled: bool = True, *,
               prechecked: bool = False) -> None:
        """Apply encodings onto the image, write digests and manifest; drop the journal."""
        rows = page_numbers.astype(np.intp)
        later = self.fsync and self.settle_later and journaled   # the durable journal is the commit point
        image, digest_file = self._mapped()
        try:
            _apply_encodings(image.view(np.ndarray), page_numbers, encodings, prechecked=prechecked)
        except ReplicaError as exc:
            raise ReplicaError(f"replica {self.path}: epoch {manifest['epoch']}: {exc}") from None
        try:
            digest_file[rows] = digests
            if self.fsync and not later:
                image.flush()
                digest_file.flush()
            self._manifest_file.replace(json.dumps(manifest), sync=self.fsync and not later)
            if journaled and not later:
                self._journal.clear()
            self.unsettled = later
            self._release_dropped_pages(self.layout, layout)
        except OSError as exc:
            raise ReplicaError(f"replica {self.path}: cannot apply epoch {manifest['epoch']} ({exc.strerror})") from None
        self.layout, self.epoch, self.manifest = layout, int(manifest["epoch"]), manifest

    def _release_dropped_pages(self, old: Layout | None, new: Layout) -> None:
        """Zero the pages of regions the committed layout dropped, freeing their disk blocks where the file
        system can punch holes: nothing reads them any more, and a later layout that reuses their page
        numbers must find zeros there, as in never-written memory."""
        if old is None or old == new or old.page_size != new.page_size:
            return
        old_pages = old.page_numbers()
        dropped = old_pages[new.outside(old_pages)]
        image, digest_file = self._mapped()
        dropped = dropped[dropped < image.shape[0]]
        if not dropped.size:
            return
        rows = dropped.astype(np.intp)
        if not self._punch_holes(_page_runs(dropped), new.page_size):
            image.view(np.ndarray)[rows] = 0
        digest_file[rows] = zero_page_digest(new.page_size)
        if self.fsync:
            image.flush()
            digest_file.flush()

    def _punch_holes(self, runs: list[tuple[int, int]], page_size: int) -> bool:
        """Deallocate these page runs of the image (they read as zeros after); False where unsupported."""
        if _FALLOCATE is None:
            return False
        fd = os.open(self.path / IMAGE, os.O_RDWR)
        try:
            for first, count in runs:
                if _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, first * page_size,
                              count * page_size) != 0:
                    return False
        finally:
            os.close(fd)
        return True

    def _load_manifest(self) -> None:
        manifest = read_manifest(self.path)
        self.layout = replica_layout(manifest["page_size"], manifest["regions"], max_pages=self.max_pages)
        image_path = self.path / IMAGE
        needed = max(self.layout.total_pages, 1)
        if not image_path.exists() or os.path.getsize(image_path) < needed * self.layout.page_size \
                or not (self.path / DIGESTS).exists() or os.path.getsize(self.path / DIGESTS) < needed * 8:
            raise ReplicaError(f"replica {self.path}: {IMAGE} or {DIGESTS} is missing or shorter than the layout")
        self._map(self.layout.page_size)
        self.epoch, self.manifest = int(manifest["epoch"]), manifest

    def _recover_journal(self) -> str:
        """Replay a complete journal, discard an incomplete one; say which happened."""
        self._remove_temporaries()
        journal_path = self.path / JOURNAL
        if not journal_path.exists() or journal_path.stat().st_size == 0:
            return "none"   # an empty journal: no commit was in progress
        try:
            manifest, page_numbers, digests, encodings = _read_journal(journal_path)
        except ReplicaError:
            journal_path.unlink()
            return "discarded"
        layout = replica_layout(manifest["page_size"], manifest["regions"], max_pages=self.max_pages)
        try:
            self._load_manifest()
            if self.layout is None or self.layout.page_size != layout.page_size:
                self._discard_image()
        except ReplicaError:
            self._discard_image()
        self._ensure_files(layout)
        self._apply(manifest, layout, page_numbers, encodings, digests)
        self.settle()
        if not np.array_equal(digest_pages(self.read_pages(page_numbers, layout.page_size)), digests):
            raise ReplicaError(f"replica {self.path}: replayed journal of epoch {manifest['epoch']} "
                               f"does not reproduce its page digests")
        return "replayed"

    def _remove_temporaries(self) -> None:
        (self.path / MANIFEST_TEMPORARY).unlink(missing_ok=True)


@lru_cache(maxsize=8)
def run_format(name: str) -> PageCodec:
    """The run format (page codec without entropy layer) called ``name``; ConfigError if there is none.

    Cached: run formats hold no state, and the receiver looks one up for every batch.
    """
    codec = get_codec(name)
    if not isinstance(codec, PageCodec):
        raise ConfigError(f"codec {name!r} is not a plain run format")
    return codec


def _apply_encodings(image: np.ndarray, page_numbers: np.ndarray, encodings: Sequence[Encoded], *,
                     prechecked: bool = False) -> None:
    """Apply consecutive encodings onto rows ``page_numbers`` of ``image`` (idempotent).

    ``prechecked``: they passed ``decoded_digests``, so each is applied in one pass.
    """
    rows = page_numbers.astype(np.intp)
    start = 0
    try:
        for encoding in encodings:
            count = encoding.kinds.shape[0]
            run_format(encoding.codec).decode(encoding, image, rows=rows[start:start + count], prechecked=prechecked)
            start += count
    except (ConfigError, ValueError) as exc:
        raise ReplicaError(f"journaled encodings do not apply ({exc})") from None


def _read_journal(path: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[Encoded]]:
    """Parse and checksum a journal; ReplicaError if it is incomplete or damaged."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size < _JOURNAL_HEAD.size + _JOURNAL_TAIL.size:
        raise ReplicaError(f"{path}: journal truncated at {data.size} bytes")
    magic, header_length = _JOURNAL_HEAD.unpack_from(data.data, 0)
    checksum, end = _JOURNAL_TAIL.unpack_from(data.data, data.size - _JOURNAL_TAIL.size)
    body_end = data.size - _JOURNAL_TAIL.size
    if magic != JOURNAL_MAGIC or end != JOURNAL_END or header_length > MAX_JOURNAL_HEADER:
        raise ReplicaError(f"{path}: journal incomplete (bad magic or end marker)")
    if xxhash.xxh3_64_intdigest(data[:body_end].data) != checksum:
        raise ReplicaError(f"{path}: journal checksum mismatch")
    offset = _JOURNAL_HEAD.size
    try:
        header = json.loads(bytes(data[offset:offset + header_length]))
        manifest, count = header["manifest"], int(header["count"])
        pieces = [(str(e["codec"]), int(e["pages"]), int(e["bytes"])) for e in header["encodings"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplicaError(f"{path}: journal header malformed ({exc!r})") from None
    offset += header_length
    needed = offset + 16 * count + sum(9 * pages + 8 + nbytes for _, pages, nbytes in pieces)
    if count < 0 or needed != body_end or sum(pages for _, pages, _ in pieces) != count \
            or any(pages < 0 or nbytes < 0 for _, pages, nbytes in pieces):
        raise ReplicaError(f"{path}: journal lengths do not add up to {count} pages")
    page_numbers = data[offset:offset + 8 * count].view("<u8")
    digests = data[offset + 8 * count:offset + 16 * count].view("<u8")
    offset += 16 * count
    encodings = []
    for codec, pages, nbytes in pieces:
        kinds = data[offset:offset + pages]
        offsets = data[offset + pages:offset + 9 * pages + 8].view("<u8").copy()   # aligned for the kernels
        payload = data[offset + 9 * pages + 8:offset + 9 * pages + 8 + nbytes]
        encodings.append(Encoded(payload=payload, offsets=offsets, kinds=kinds, codec=codec, raw_size=nbytes))
        offset += 9 * pages + 8 + nbytes
    return manifest, page_numbers, digests, encodings


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a replica directory, checked for format and version."""
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ReplicaError(f"replica {path}: no {MANIFEST} (nothing committed yet?)") from None
    except (OSError, ValueError) as exc:
        raise ReplicaError(f"replica {path}: {MANIFEST} unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ReplicaError(f"replica {path}: {MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ReplicaError(f"replica {path}: manifest version {manifest.get('version')!r} unsupported "
                           f"(this reader knows {FORMAT_VERSION})")
    for key in ("page_size", "regions", "epoch", "image_digest"):
        if key not in manifest:
            raise ReplicaError(f"replica {path}: manifest lacks {key!r}")
    return manifest


def region_keys(regions: Sequence[Region | dict[str, Any]]) -> list[str]:
    """Region names (of Regions or their meta dicts), made unique by appending the start address where names
    repeat."""
    pairs = [(r.name, r.start) if isinstance(r, Region) else (str(r["name"]), int(r["start"])) for r in regions]
    names = [name for name, _ in pairs]
    return [name if names.count(name) == 1 else f"{name}@0x{start:x}" for name, start in pairs]


def _commit_state(path: Path) -> tuple[bytes, bytes]:
    """The manifest's bytes and the journal's head and header bytes (b"" where absent or empty).

    Every commit writes a journal whose header holds its new manifest, then the manifest;
    both name the epoch and commit time, so any commit that begins or ends changes this
    (file sizes, inode numbers and timestamps do not always: the journal is rewritten in
    place, the manifest files swap names, and ext4's timestamps are coarse).
    """
    try:
        manifest = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        manifest = b""
    try:
        with open(path / JOURNAL, "rb") as journal:
            head = journal.read(_JOURNAL_HEAD.size)
            if len(head) == _JOURNAL_HEAD.size:
                head += journal.read(min(_JOURNAL_HEAD.unpack(head)[1], MAX_JOURNAL_HEADER))
    except FileNotFoundError:
        head = b""
    return manifest, head


def load_replica(path: str | os.PathLike, *, attempts: int = 100, typed: bool = False) -> dict[str, np.ndarray]:
    """The committed memory of a replica: one uint8 array (npages * page_size bytes) per region.

    Keys are region names (``name@0xSTART`` where names repeat). Read-only, so it
    may run while a receiver commits: the image is only written while a complete
    journal exists, and applying that journal (idempotent) to the copy in memory
    gives its epoch; a copy during which a commit began or ended is taken again. The
    result is always exactly one committed epoch; the files are never written.
    ``typed``: each region as the array it was (``load_arrays``).
    """
    path = Path(path)
    for _ in range(attempts):
        before = _commit_state(path)
        regions = _load_once(path, typed)
        if _commit_state(path) == before:
            return regions
    raise ReplicaError(f"replica {path}: a new commit began during each of {attempts} attempts to read it")


def _load_once(path: Path, typed: bool = False) -> dict[str, np.ndarray]:
    """The regions as the image and a complete journal (if any) make them."""
    store = ReplicaStore(path, fsync=False, writable=False)
    try:
        journal = store.pending_journal()
        if journal is not None:
            manifest = journal[0]
            layout = replica_layout(manifest["page_size"], manifest["regions"], max_pages=store.max_pages)
        elif store.layout is not None:
            layout = store.layout
        else:
            raise ReplicaError(f"replica {path}: nothing committed yet")
        image = np.zeros((max(layout.total_pages, 1), layout.page_size), dtype=np.uint8)
        if store._image is not None and store._image.shape[1] == layout.page_size:
            rows = min(image.shape[0], store._image.shape[0])
            image[:rows] = store._image[:rows]
        if journal is not None:
            _, page_numbers, _, encodings = journal
            _apply_encodings(image, page_numbers, encodings)
        regions = {key: (r, image[r.first_page:r.end_page].reshape(-1))
                   for key, r in zip(region_keys(layout.regions), layout.regions)}
        return {key: region_array(r, data) if typed else data for key, (r, data) in regions.items()}
    finally:
        store.close()


def region_array(region: Region, data: np.ndarray) -> np.ndarray:
    """A region's bytes (``npages * page_size`` uint8) as the array it was: its dtype and shape from the
    layout, or the bytes themselves for a region without them (replicas written before they travelled)."""
    if not region.dtype:
        return data
    dtype = np.dtype(region.dtype)
    shape = region.shape
    count = int(np.prod(shape, dtype=np.int64))
    return data[:count * dtype.itemsize].view(dtype).reshape(shape)


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The committed memory of a replica as the arrays the sender tracked: ``load_replica`` with each
    region's dtype and shape applied (uint8 bytes where the layout names none)."""
    return load_replica(path, typed=True)


@dataclass
class VerifyReport:
    """What ``verify_replica`` found."""

    path: str
    epoch: int
    pages: int
    bad_pages: list[int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_replica(path: str | os.PathLike, *, max_listed: int = 20) -> VerifyReport:
    """Check a replica, read-only: manifest, file sizes, every page against its stored digest, the image
    digest, and that no interrupted commit is pending."""
    problems: list[str] = []
    directory = Path(path)
    if not directory.exists():
        return VerifyReport(str(path), 0, 0, [], [f"replica {path}: no such directory (check the path; "
                                                    "a replica-sink creates it)"])
    if not directory.is_dir():
        return VerifyReport(str(path), 0, 0, [], [f"replica {path}: a file, not a replica directory (give the "
                                                    "directory a replica-sink path= wrote)"])
    if not (directory / MANIFEST).exists() and not (directory / LOCK).exists():
        return VerifyReport(str(path), 0, 0, [], [f"replica {path}: not a replica (no {MANIFEST} or {LOCK}); "
                                                    "give the directory a replica-sink path= wrote"])
    try:
        store = ReplicaStore(path, fsync=False, writable=False)
    except ReplicaError as exc:
        return VerifyReport(str(path), 0, 0, [], [str(exc)])
    try:
        journal = store.pending_journal()
        if journal is not None and journal[0].get("epoch") != store.epoch:   # else applied, not yet settled
            return VerifyReport(str(path), store.epoch, 0, [], [
                f"replica {path}: the commit of epoch {journal[0].get('epoch')} was interrupted; opening the "
                f"replica for writing (a restarted replica-sink) completes it"])
        if store.is_empty:
            return VerifyReport(str(path), 0, 0, [], [f"replica {path}: nothing committed yet"])
        if store.layout is None:
            return VerifyReport(str(path), 0, 0, [], [f"replica {path}: no layout committed"])
        image, digest_file = store._mapped()
        page_numbers = store.layout.page_numbers()
        bad: list[int] = []
        for start in range(0, page_numbers.size, 4096):
            chunk = page_numbers[start:start + 4096].astype(np.intp)
            actual = digest_pages(np.asarray(image[chunk]))
            mismatched = chunk[actual != np.asarray(digest_file[chunk])]
            bad.extend(int(p) for p in mismatched[:max_listed - len(bad)])
            if mismatched.size:
                problems.append(f"{mismatched.size} pages from page {int(mismatched[0])} differ from their digest")
        stored = int(str(store.manifest["image_digest"]), 16)
        computed = store.image_digest()
        if computed != stored:
            problems.append(f"image digest {_hex(computed)} != manifest {_hex(stored)}")
        return VerifyReport(str(path), store.epoch, int(page_numbers.size), bad, problems)
    finally:
        store.close()
