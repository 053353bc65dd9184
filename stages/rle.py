"""rle: run-length encode the XOR difference of each DELTA page (DELTAS -> ENCODED).

``format=native|xbzrle|xen`` picks the run format (see ``stages.codecs``).
FULL and RAW pages go into the payload as their raw bytes, ZERO pages as an
empty slice; a delta that would not be smaller than the page comes back from
the codec as FULL (an overflow). The output lists encoded pages first, then
whole pages, then zero pages (page order inside an epoch does not matter), so
the payload is built from two contiguous pieces without a loop over pages.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from pipeline.batch import DELTAS, ENCODED, Batch, PageKind
from pipeline.errors import CorruptData
from pipeline.stage import Property, Stage
from stages.common.checks import array_of, check_format_page_size, first_bad_kind, page_data
from stages.codecs import PAGE_CODECS, Encoded, get_page_codec

RUN_FORMATS = tuple(PAGE_CODECS)
_DELTAS_KINDS = (PageKind.DELTA, PageKind.FULL, PageKind.RAW, PageKind.ZERO)


def assemble_encoded(batch: Batch, kinds: np.ndarray, delta_rows: np.ndarray, encoded: Encoded | None,
                     codec_name: str) -> Batch:
    """The ENCODED batch for ``batch``'s pages.

    ``encoded`` holds the encodings of ``delta_rows`` (in that order); other
    pages of kind FULL/RAW travel as raw bytes, ZERO pages as empty slices.
    """
    whole_rows = np.flatnonzero((kinds == PageKind.FULL) | (kinds == PageKind.RAW))
    zero_rows = np.flatnonzero(kinds == PageKind.ZERO)
    if encoded is None:
        delta_payload = np.empty(0, dtype=np.uint8)
        delta_offsets = np.zeros(1, dtype=np.uint64)
        delta_kinds = np.empty(0, dtype=np.uint8)
    else:
        delta_offsets = np.asarray(encoded.offsets, dtype=np.uint64)
        delta_payload = encoded.payload[: int(delta_offsets[-1])]
        delta_kinds = np.asarray(encoded.kinds, dtype=np.uint8)
    page_size = batch.page_size
    delta_end = int(delta_offsets[-1])
    data = page_data(batch, "rle")
    if whole_rows.shape[0] == batch.npages:
        payload = data.reshape(-1)  # every page whole (a first checkpoint): no copy
    elif whole_rows.shape[0]:
        payload = np.empty(delta_end + whole_rows.shape[0] * page_size, dtype=np.uint8)
        payload[:delta_end] = delta_payload
        # mode="clip": the rows are valid by construction, and the default mode copies through a buffer
        np.take(data, whole_rows, axis=0, out=payload[delta_end:].reshape(-1, page_size), mode="clip")
    else:
        payload = delta_payload
    whole_ends = delta_end + page_size * np.arange(1, whole_rows.shape[0] + 1, dtype=np.uint64)
    zero_ends = np.full(zero_rows.shape[0], payload.shape[0], dtype=np.uint64)
    order = np.concatenate([delta_rows, whole_rows, zero_rows])
    return batch.with_(
        format=ENCODED,
        page_numbers=batch.page_numbers[order],
        kinds=np.concatenate([delta_kinds, kinds[whole_rows], kinds[zero_rows]]),
        data=None,
        reference=None,
        payload=payload,
        offsets=np.concatenate([delta_offsets, whole_ends, zero_ends]),
        meta={**batch.meta, "codec": codec_name, "raw_size": int(payload.shape[0])},
    )


class RunLengthEncode(Stage):
    factory_name = "rle"
    description = "Run-length encode each page's XOR delta (native, QEMU xbzrle or Xen format); whole pages pass as-is"
    input_caps = (DELTAS,)
    output_caps = ENCODED

    format = Property("choice", "native", "Run-length format", choices=RUN_FORMATS)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._codec = get_page_codec(self.format)
        self.counters.update(overflows=0, unchanged=0, bytes_in=0, bytes_out=0)

    def process(self, batch: Batch) -> Iterable[Batch]:
        self._check(batch)
        delta_rows = np.flatnonzero(batch.kinds == PageKind.DELTA)
        encoded = None
        if delta_rows.shape[0]:
            # Fancy indexing copies, so the codec may bring ``cached`` up to date without touching the batch.
            cached = array_of(batch, "reference", self.factory_name)[delta_rows]
            data = page_data(batch, self.factory_name)
            current = np.ascontiguousarray(data) if delta_rows.shape[0] == batch.npages else data[delta_rows]
            encoded = self._codec.encode(current, cached)
            self.counters["overflows"] += int(np.count_nonzero(encoded.kinds == PageKind.FULL))
            self.counters["unchanged"] += int(np.count_nonzero(encoded.kinds == PageKind.UNCHANGED))
        out = assemble_encoded(batch, batch.kinds, delta_rows, encoded, self._codec.name)
        self.counters["bytes_in"] += int(np.count_nonzero(batch.kinds != PageKind.ZERO)) * batch.page_size
        self.counters["bytes_out"] += int(array_of(out, "payload", self.factory_name).shape[0])
        yield out

    def _check(self, batch: Batch) -> None:
        where = self.factory_name
        if batch.format != DELTAS or batch.data is None:
            raise CorruptData(f"{where}: expected a {DELTAS} batch with page data, got {batch.format!r} "
                              f"(epoch {batch.epoch})")
        try:
            batch.validate()
        except CorruptData as exc:
            raise CorruptData(f"{where}: {exc}") from None
        bad = first_bad_kind(batch.kinds, _DELTAS_KINDS)
        if bad is not None:
            raise CorruptData(f"{where}: {DELTAS} batch of epoch {batch.epoch} has page kind {bad}")
        if batch.reference is None and np.any(batch.kinds == PageKind.DELTA):
            raise CorruptData(f"{where}: {DELTAS} batch of epoch {batch.epoch} has DELTA pages but no reference")
        check_format_page_size(self._codec, batch, where)
