"""Recorded memory traces: read them checked, and replay them into the page pairs a codec sees.

A trace is an ``.npz`` in the layout of ``../shared/corpus/README.md``:
``base`` (every tracked page at the first checkpoint), ``region_starts`` and
``region_npages`` (the tracked mappings), and per epoch NNN ``epochNNN_pages``
and ``epochNNN_data`` (the pages that changed since the previous checkpoint
and their new contents). Replaying the epochs over ``base`` gives, for every
changed page, the pair (copy last sent, new contents): exactly the
``cached`` and ``current`` arguments of ``codec.encode`` (``load_trace_pairs``).
``read_trace`` gives the whole trace for benchmarks that replay epochs.

Trace files are untrusted input: every shape, dtype and page number is
checked, and a malformed file raises ``CorruptData`` naming the array.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import CorruptData, TransportError

CORPUS_ENV = "PAGEPIPE_CORPUS"
CORPUS_FILE = "memcached-trace.npz"
REPO_ROOT = Path(__file__).resolve().parents[2]
_EPOCH_KEY = re.compile(r"^epoch(\d{3,})_(pages|data)$")


@dataclass(frozen=True)
class PagePairs:
    """Pages as last sent (``cached``) and their new contents (``current``), both ``(n, page_size)`` uint8."""

    name: str
    cached: np.ndarray
    current: np.ndarray

    @property
    def npages(self) -> int:
        return int(self.current.shape[0])

    @property
    def page_size(self) -> int:
        return int(self.current.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of current page data: what throughput is counted in."""
        return int(self.current.nbytes)


def find_corpus() -> Path | None:
    """The recorded memcached trace: ``$PAGEPIPE_CORPUS`` (file or folder), else ``../shared/corpus``; None if absent."""
    configured = os.environ.get(CORPUS_ENV)
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared" / "corpus"
    if candidate.is_dir():
        candidate = candidate / CORPUS_FILE
    return candidate if candidate.is_file() else None


@dataclass(frozen=True)
class RecordedTrace:
    """A whole trace, checked: the pages at the first checkpoint and every epoch's changed pages."""

    base: np.ndarray            # (npages, page_size) uint8
    region_starts: np.ndarray   # uint64, virtual start of each tracked mapping
    region_npages: np.ndarray   # uint64, its length in pages (they sum to npages)
    epochs: list[tuple[np.ndarray, np.ndarray]]  # (page numbers uint64, new contents (k, page_size) uint8)


def read_trace(path: str | Path, *, max_epochs: int | None = None) -> RecordedTrace:
    """Read and check a trace (its first ``max_epochs`` epochs).

    Raises TransportError if the file cannot be read, CorruptData if it is not a valid trace.
    """
    with _opened(Path(path)) as (path, archive):
        base, starts, npages = _layout(path, archive)
        epochs = list(itertools.islice(_epochs(path, archive, base.shape), max_epochs))
    return RecordedTrace(base, starts, npages, epochs)


def load_trace_pairs(path: str | Path, *, max_pages: int | None = None) -> PagePairs:
    """Replay a trace and return its page pairs, epoch by epoch, at most ``max_pages`` of them.

    Raises TransportError if the file cannot be read, CorruptData if it is not a valid trace.
    """
    limit = sys.maxsize if max_pages is None else max_pages
    cached_parts: list[np.ndarray] = []
    current_parts: list[np.ndarray] = []
    collected = 0
    with _opened(Path(path)) as (path, archive):
        state = _layout(path, archive)[0].copy()
        for pages, data in _epochs(path, archive, state.shape):
            if collected >= limit:
                break
            index = pages.astype(np.intp)
            cached_parts.append(state[index][: limit - collected])
            current_parts.append(data[: limit - collected])
            collected += cached_parts[-1].shape[0]
            state[index] = data
    empty = np.empty((0, state.shape[1]), dtype=np.uint8)
    return PagePairs(
        name=path.stem,
        cached=np.concatenate(cached_parts) if cached_parts else empty,
        current=np.concatenate(current_parts) if current_parts else empty,
    )


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[tuple[Path, np.lib.npyio.NpzFile]]:
    """The open archive; any failure to read it becomes TransportError or CorruptData naming the file."""
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise TransportError(f"trace {path}: cannot read ({exc})") from None
    except (ValueError, zipfile.BadZipFile) as exc:
        raise CorruptData(f"trace {path}: not an .npz archive ({exc})") from None
    with archive:
        try:
            yield path, archive
        except CorruptData:
            raise
        except (ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise CorruptData(f"trace {path}: unreadable array ({exc})") from None
        except MemoryError:
            raise CorruptData(f"trace {path}: an array claims more bytes than memory holds") from None


def _layout(path: Path, archive: np.lib.npyio.NpzFile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``base``, ``region_starts``, ``region_npages``, checked against each other."""
    for key in ("base", "region_starts", "region_npages"):
        if key not in archive.files:
            raise CorruptData(f"trace {path}: missing array {key!r}")
    base = _checked(path, archive, "base", np.uint8, ndim=2)
    npages, page_size = base.shape
    if page_size == 0:
        raise CorruptData(f"trace {path}: 'base' has pages of 0 bytes")
    region_npages = _checked(path, archive, "region_npages", np.uint64, ndim=1)
    region_starts = _checked(path, archive, "region_starts", np.uint64, ndim=1)
    if region_starts.shape != region_npages.shape or int(region_npages.sum(dtype=np.uint64)) != npages:
        raise CorruptData(f"trace {path}: regions ({region_npages.shape[0]} of them) do not cover the "
                          f"{npages} pages of 'base'")
    return base, region_starts, region_npages


def _epochs(path: Path, archive: np.lib.npyio.NpzFile,
            base_shape: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each epoch's (page numbers, new contents) in order, read and checked one at a time."""
    npages, page_size = base_shape
    for epoch in _epoch_numbers(path, archive):
        pages_key, data_key = f"epoch{epoch:03d}_pages", f"epoch{epoch:03d}_data"
        pages = _checked(path, archive, pages_key, np.uint64, ndim=1)
        data = _checked(path, archive, data_key, np.uint8, ndim=2)
        if data.shape != (pages.shape[0], page_size):
            raise CorruptData(f"trace {path}: {data_key!r} has shape {data.shape}, "
                              f"expected {(pages.shape[0], page_size)}")
        if pages.size and int(pages.max()) >= npages:
            raise CorruptData(f"trace {path}: {pages_key!r} names page {int(pages.max())}, "
                              f"but the trace tracks {npages} pages")
        if np.unique(pages).size != pages.size:
            raise CorruptData(f"trace {path}: {pages_key!r} lists a page twice")
        yield pages, data


def _epoch_numbers(path: Path, archive: np.lib.npyio.NpzFile) -> list[int]:
    """Epoch numbers in order; each must have both arrays, numbered 0, 1, 2, ... without gaps."""
    found: dict[int, set[str]] = {}
    for key in archive.files:
        match = _EPOCH_KEY.match(key)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    numbers = sorted(found)
    if numbers != list(range(len(numbers))):
        raise CorruptData(f"trace {path}: epochs {numbers[:5]}... are not numbered 0, 1, 2, ...")
    for number in numbers:
        if found[number] != {"pages", "data"}:
            raise CorruptData(f"trace {path}: epoch {number:03d} lacks its "
                              f"{'pages' if 'pages' not in found[number] else 'data'} array")
    return numbers


def _checked(path: Path, archive: np.lib.npyio.NpzFile, key: str, dtype: type, *, ndim: int) -> np.ndarray:
    array = archive[key]
    if array.dtype != dtype or array.ndim != ndim:
        raise CorruptData(f"trace {path}: {key!r} is {array.dtype}{list(array.shape)}, "
                          f"expected {np.dtype(dtype)} with {ndim} dimension(s)")
    return array
