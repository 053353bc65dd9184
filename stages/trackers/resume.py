"""Resume a program from its replica: the last committed checkpoint back as live, tracked arrays.

After a failover the backup runs the program again from the replica::

    from stages.replica_store import resume_from_replica
    arrays = resume_from_replica("/var/lib/replica")     # {name: array}, verified, page-aligned
    source = RegionSource(regions=arrays)                 # replicate again, to a new backup

Each array has the name, dtype and shape its region had at the sender (a region
without them, from a replica written before they travelled, comes back as its
uint8 bytes), and lives in its own anonymous mapping like ``tracked_array``'s,
so ``region-src`` tracks it with userfaultfd; a new ``RegionSource``'s first
checkpoint carries every page, as always.

Nothing is returned unless the replica verifies: every page read is checked
against its stored digest while it is still in cache, and the digests against
the manifest's image digest. A manifest of another format version is refused
with ReplicaError. Like a restarted replica-sink, resuming completes a commit
that was interrupted (its journal is complete); the replica must not be open
for writing elsewhere then (a running receiver's lock makes that a
ReplicaLocked; after a failover its sink has settled, so nothing is pending).
A commit that begins while the files are read makes the reading start again.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ReplicaError
from stages.common.pages import digest_pages
from stages.common.layout import Region
from stages.common.replica_store import (IMAGE, ReplicaStore, _commit_state, read_manifest, region_array,
                                         region_keys)

from .region import page_mapping

CHUNK_BYTES = 4 << 20
"""Read and verify in pieces this large: each piece is digested while it is still in the CPU cache."""
ATTEMPTS = 20


def resume_from_replica(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The replica's committed checkpoint as {region name: array} in page-aligned mappings, verified.

    Raises ReplicaError if the directory holds no committed checkpoint, its format
    version is not this reader's, or any page differs from its digest.
    """
    path = Path(path)
    read_manifest(path)     # format and version first, with their own clear message
    if (path / "journal").exists() and (path / "journal").stat().st_size:
        ReplicaStore(path, fsync=True).close()   # completes (or discards) an interrupted commit
    for _ in range(ATTEMPTS):
        before = _commit_state(path)
        arrays = _read_verified(path)
        if _commit_state(path) == before:
            return arrays
    raise ReplicaError(f"replica {path}: a new commit began during each of {ATTEMPTS} attempts to resume from it")


def _read_verified(path: Path) -> dict[str, np.ndarray]:
    store = ReplicaStore(path, fsync=False, writable=False)
    try:
        if store.is_empty or store.layout is None:
            raise ReplicaError(f"replica {path}: nothing committed yet")
        layout = store.layout
        digests = np.asarray(store._digests)
        stored = int(str(store.manifest["image_digest"]), 16)
        if store.image_digest() != stored:
            raise ReplicaError(f"replica {path}: the page digests do not add up to the manifest's image digest "
                               f"(damaged digests.u64 or manifest)")
        arrays: dict[str, np.ndarray] = {}
        with open(path / IMAGE, "rb", buffering=0) as image:
            for key, region in zip(region_keys(layout.regions), layout.regions):
                data = _read_region(image, region, layout.page_size, digests, path)
                arrays[key] = region_array(region, data)
        return arrays
    finally:
        store.close()


def _read_region(image: Any, region: Region, page_size: int, digests: np.ndarray, path: Path) -> np.ndarray:
    """One region's pages read from the image into a fresh mapping, each checked against its digest.

    Each piece is digested by a helper thread while the next is read (both release the GIL), so the check
    costs little more than the read.
    """
    first, npages = region.first_page, region.npages
    mapping = page_mapping(npages * page_size, prefault=True)
    data = np.frombuffer(mapping, dtype=np.uint8, count=npages * page_size)
    view = memoryview(mapping)
    pages_per_chunk = max(1, CHUNK_BYTES // page_size)

    def check(low: int, high: int) -> None:
        actual = digest_pages(data[low * page_size:high * page_size].reshape(-1, page_size))
        bad = np.flatnonzero(actual != digests[first + low:first + high])
        if bad.size:
            raise ReplicaError(f"replica {path}: region {region.name!r}: page {first + low + int(bad[0])} "
                               f"differs from its digest ({bad.size} pages in this piece); nothing resumed")

    checking = None
    with ThreadPoolExecutor(1, thread_name_prefix="resume-verify") as verifier:
        try:
            for low in range(0, npages, pages_per_chunk):
                high = min(npages, low + pages_per_chunk)
                start, end = low * page_size, high * page_size
                if os.preadv(image.fileno(), [view[start:end]], (first + low) * page_size) != end - start:
                    raise ReplicaError(f"replica {path}: {IMAGE} ends inside region {region.name!r}")
                if checking is not None:
                    checking.result()
                checking = verifier.submit(check, low, high)
            if checking is not None:
                checking.result()
        finally:
            view.release()
    return data
