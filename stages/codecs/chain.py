"""A page codec followed by an entropy codec ("native+zstd"): run-length encode, then compress the payload."""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import CorruptData
from stages.codecs.encoded import Encoded
from stages.codecs.entropy import EntropyCodec
from stages.codecs.page_codec import PageCodec
from stages.common.pages import check_pages


class ChainCodec:
    """``encode`` runs the page codec then compresses the whole payload; ``decode`` undoes both.

    ``Encoded.offsets`` index the payload after decompression; ``raw_size``
    is its length. Decompression is bounded by what the page codec could have
    produced for that many pages of the replica's size.
    """

    def __init__(self, page_codec: PageCodec, entropy_codec: EntropyCodec):
        self.page_codec = page_codec
        self.entropy_codec = entropy_codec
        self.name = f"{page_codec.name}+{entropy_codec.name}"

    def get_config(self) -> dict[str, Any]:
        config = {**self.page_codec.get_config(), **self.entropy_codec.get_config()}
        config["id"] = self.name
        return config

    def __repr__(self) -> str:
        return f"ChainCodec({self.page_codec!r}, {self.entropy_codec!r})"

    def max_page_bytes(self, page_size: int) -> int:
        return self.page_codec.max_page_bytes(page_size)

    def unchanged_bytes(self) -> bytes:
        return self.page_codec.unchanged_bytes()

    def encode(self, current: np.ndarray, cached: np.ndarray, slots: np.ndarray | None = None) -> Encoded:
        """Run-length encode as the page codec does, then compress the payload as one unit."""
        encoded = self.page_codec.encode(current, cached, slots)
        encoded.payload = self.entropy_codec.compress(encoded.payload)
        encoded.codec = self.name
        return encoded

    def decompressed(self, encoded: Encoded, page_size: int) -> Encoded:
        """``encoded`` with its payload decompressed (bounded by ``raw_size`` and the page count)."""
        raw_size = encoded.raw_size
        offsets = np.asarray(encoded.offsets)
        npages = int(np.asarray(encoded.kinds).shape[0])
        if isinstance(raw_size, bool) or not isinstance(raw_size, (int, np.integer)):
            raise CorruptData(f"{self.name}: raw size {raw_size!r} is not a byte count")
        limit = npages * self.page_codec.max_page_bytes(page_size)
        if not 0 <= raw_size <= limit:
            raise CorruptData(f"{self.name}: raw size {raw_size} outside 0..{limit} for {npages} pages")
        if offsets.ndim != 1 or offsets.shape[0] != npages + 1 or int(offsets[-1]) != raw_size:
            raise CorruptData(f"{self.name}: offsets do not end at the raw size {raw_size}")
        raw = self.entropy_codec.decompress(np.asarray(encoded.payload), int(raw_size))
        return Encoded(payload=raw, offsets=encoded.offsets, kinds=encoded.kinds, codec=self.page_codec.name,
                       raw_size=int(raw_size))

    def decode(self, encoded: Encoded, replica: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Decompress, then apply as the page codec does (nothing is written if anything is corrupt)."""
        check_pages(replica, "replica", writable=True)
        self.page_codec.check_page_size(replica.shape[1])
        self.page_codec.decode(self.decompressed(encoded, replica.shape[1]), replica, rows)

    def system_bytes(self, encoded: Encoded, index: int, page_size: int = 4096) -> bytes:
        """Page ``index``'s bytes as the original system would carry them (after decompression)."""
        return self.page_codec.system_bytes(self.decompressed(encoded, page_size), index)
