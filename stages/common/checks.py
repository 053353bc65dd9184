"""Checks of incoming batches that several stages share: each raises the documented error naming the stage."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from pipeline.batch import ENCODED, KIND_RAW, PAGES, Batch, PageKind
from pipeline.errors import ConfigError, CorruptData
from stages.codecs import PageCodec, is_entropy_coded
from stages.common.pages import check_page_size


def array_of(batch: Batch, name: str, where: str) -> np.ndarray:
    """The batch's ``name`` array (data, reference, payload or offsets); CorruptData naming ``where`` if absent."""
    array = getattr(batch, name)
    if array is None:
        raise CorruptData(f"{where}: {batch.format} batch of epoch {batch.epoch} carries no {name}")
    return array


def page_data(batch: Batch, where: str) -> np.ndarray:
    """The batch's page contents; CorruptData naming ``where`` if it carries none."""
    return array_of(batch, "data", where)


def check_pages_batch(batch: Batch, where: str) -> None:
    """Raise CorruptData naming ``where`` unless ``batch`` is a consistent PAGES batch with known kinds."""
    if batch.format != PAGES:
        raise CorruptData(f"{where}: expected a {PAGES} batch, got {batch.format!r} (epoch {batch.epoch})")
    if batch.data is None:
        raise CorruptData(f"{where}: {PAGES} batch of epoch {batch.epoch} carries no page data")
    try:
        batch.validate()
    except CorruptData as exc:
        raise CorruptData(f"{where}: {exc}") from None
    if batch.data.dtype != np.uint8 or batch.page_numbers.dtype != np.uint64 or batch.kinds.dtype != np.uint8:
        raise CorruptData(f"{where}: batch of epoch {batch.epoch} has wrong dtypes")
    if not batch.data.flags.c_contiguous:
        raise CorruptData(f"{where}: page data of epoch {batch.epoch} is not C-contiguous (np.ascontiguousarray)")
    try:
        check_page_size(batch.page_size)
    except ValueError as exc:
        raise CorruptData(f"{where}: batch of epoch {batch.epoch}: {exc}") from None
    if batch.npages and int(batch.kinds.max()) > KIND_RAW:  # NORMAL, ZERO and RAW are 0, 1 and 2
        bad = first_bad_kind(batch.kinds, (PageKind.NORMAL, PageKind.ZERO, PageKind.RAW))
        raise CorruptData(f"{where}: {PAGES} batch of epoch {batch.epoch} has page kind {bad}, "
                          "expected NORMAL/ZERO/RAW")


def first_bad_kind(kinds: np.ndarray, allowed: Iterable[PageKind]) -> int | None:
    """The first value of ``kinds`` not in ``allowed``, or None (one table lookup per page)."""
    table = np.zeros(256, dtype=bool)
    table[list(allowed)] = True
    valid = table[kinds]
    return None if valid.all() else int(kinds[np.argmin(valid)])


def check_format_page_size(codec: PageCodec, batch: Batch, where: str) -> None:
    """ConfigError naming ``where`` if the run format does not define the batch's page size (xbzrle, xen: 4096)."""
    try:
        codec.check_page_size(batch.page_size)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_encoded_batch(batch: Batch, where: str) -> None:
    """Raise CorruptData naming ``where`` unless ``batch`` is a consistent ENCODED batch: offsets within its
    payload, or, for an entropy-coded chain, within the decompressed size (bounded where it is decompressed)."""
    if batch.format != ENCODED or batch.payload is None or batch.offsets is None:
        raise CorruptData(f"{where}: expected an {ENCODED} batch with payload and offsets, got {batch.format!r} "
                          f"(epoch {batch.epoch})")
    if batch.payload.dtype != np.uint8 or batch.payload.ndim != 1:
        raise CorruptData(f"{where}: payload of epoch {batch.epoch} is not a 1-D uint8 array")
    try:
        batch.validate()
    except CorruptData as exc:
        raise CorruptData(f"{where}: {exc}") from None
    chain = batch.meta.get("codec")
    if batch.npages and not (isinstance(chain, str) and is_entropy_coded(chain)) \
            and int(batch.offsets[-1]) > batch.payload.shape[0]:
        raise CorruptData(f"{where}: batch epoch {batch.epoch}: offsets not increasing within payload of "
                          f"{batch.payload.shape[0]} bytes")
