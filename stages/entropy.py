"""Entropy stages: zstd / lz4 compress a whole ENCODED batch's payload; decode undoes them.

One compressed frame per batch: the run-length output of hundreds of pages
plus the whole pages that missed the cache, which is where most of the ratio
beyond plain run-length encoding comes from. ``meta["codec"]`` names the
chain ("native+zstd") and ``meta["raw_size"]`` keeps the payload length before
entropy coding, so the receiver can bound decompression. A batch carries at
most one entropy layer: the receiver knows the size of nothing in between.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from pipeline.batch import ENCODED, PAGES, Batch
from pipeline.errors import ConfigError, CorruptData
from pipeline.stage import Property, Stage
from stages.codecs import ENTROPY_CODECS, PageCodec, get_codec, get_entropy_codec, split_chain_name
from stages.common.checks import array_of, check_encoded_batch
from stages.common.pages import check_page_size
from stages.rle import RUN_FORMATS

ENTROPY_CODERS = tuple(ENTROPY_CODECS)


def split_chain(batch: Batch, where: str) -> tuple[str, list[str]]:
    """``meta["codec"]`` "native+zstd" -> ("native", ["zstd"]); CorruptData if missing or malformed."""
    chain = batch.meta.get("codec")
    if not isinstance(chain, str) or not chain:
        raise CorruptData(f"{where}: {ENCODED} batch of epoch {batch.epoch} names no codec (meta['codec'] = {chain!r})")
    return split_chain_name(chain)


class _Compress(Stage):
    """Compress the payload of each ENCODED batch as one frame of ``coder``."""

    coder = ""
    input_caps = (ENCODED,)
    output_caps = ENCODED

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._codec = get_entropy_codec(self.coder, **self._coder_options())
        self.counters.update(bytes_in=0, bytes_out=0)

    def _coder_options(self) -> dict[str, Any]:
        return {}

    def process(self, batch: Batch) -> Iterable[Batch]:
        check_encoded_batch(batch, self.factory_name)
        run_format, layers = split_chain(batch, self.factory_name)
        if layers:
            raise ConfigError(f"{self.factory_name}: batch of epoch {batch.epoch} is already entropy coded "
                              f"({batch.meta['codec']}); use one entropy stage")
        raw_size = int(array_of(batch, "offsets", self.factory_name)[-1])
        payload = array_of(batch, "payload", self.factory_name)
        compressed = self._codec.compress(np.ascontiguousarray(payload[:raw_size]))
        self.counters["bytes_in"] += raw_size
        self.counters["bytes_out"] += int(compressed.shape[0])
        yield batch.with_(payload=compressed,
                          meta={**batch.meta, "codec": f"{run_format}+{self.coder}", "raw_size": raw_size})


class Zstd(_Compress):
    factory_name = "zstd"
    description = "Compress each batch's run-length payload with zstd (one frame per batch)"
    coder = "zstd"

    level = Property("int", 1, "zstd compression level", minimum=1, maximum=22)

    def _coder_options(self) -> dict[str, Any]:
        return {"level": self.level}


class Lz4(_Compress):
    factory_name = "lz4"
    description = "Compress each batch's run-length payload with lz4 (faster, weaker than zstd)"
    coder = "lz4"


class Decode(Stage):
    """Receiver side: undo the entropy layer; pages are applied later, by the replica-sink onto its own copy.

    PAGES batches (a stream of whole pages, such as a trace file) pass unchanged.
    """

    factory_name = "decode"
    description = "Receiver: undo the entropy layer named in meta['codec'] (ENCODED -> ENCODED, pages not applied)"
    input_caps = (ENCODED, PAGES)
    output_caps = ENCODED

    max_batch = Property("size", "64MiB", "Largest payload a batch may decompress to (bounds memory per batch)",
                         minimum=1)

    def __init__(self, **properties: Any):
        super().__init__(**properties)
        self._codecs: dict[str, Any] = {}
        self.counters.update(bytes_in=0, bytes_out=0)

    def output_format(self, input_format: str | None) -> str | None:
        return ENCODED if input_format == ENCODED else input_format  # PAGES pass through; ANY stays ANY

    def process(self, batch: Batch) -> Iterable[Batch]:
        where = self.factory_name
        if batch.format == PAGES:
            yield batch
            return
        check_encoded_batch(batch, where)
        run_format, layers = split_chain(batch, where)
        run_codec = self._codec(run_format, RUN_FORMATS, "run format", batch)
        if not layers:
            yield batch
            return
        if len(layers) > 1:
            raise CorruptData(f"{where}: batch of epoch {batch.epoch} has {len(layers)} entropy layers "
                              f"({batch.meta['codec']}); at most one is supported")
        entropy_codec = self._codec(layers[0], ENTROPY_CODERS, "entropy codec", batch)
        raw_size = self._raw_size(batch, run_codec)
        compressed = array_of(batch, "payload", where)
        payload = entropy_codec.decompress(compressed, raw_size)
        out = batch.with_(payload=payload, meta={**batch.meta, "codec": run_format, "raw_size": raw_size})
        check_encoded_batch(out, where)
        self.counters["bytes_in"] += int(compressed.shape[0])
        self.counters["bytes_out"] += raw_size
        yield out

    def _raw_size(self, batch: Batch, run_codec: PageCodec) -> int:
        """meta["raw_size"], checked against max-batch, the page count and the offsets."""
        raw_size = batch.meta.get("raw_size")
        where = f"{self.factory_name}: batch of epoch {batch.epoch}"
        if not isinstance(raw_size, int) or isinstance(raw_size, bool) or raw_size < 0:
            raise CorruptData(f"{where}: meta['raw_size'] = {raw_size!r} is not a byte count")
        if raw_size > self.max_batch:
            raise CorruptData(f"{where}: raw_size {raw_size} exceeds max-batch {self.max_batch}")
        try:
            check_page_size(batch.page_size)
            run_codec.check_page_size(batch.page_size)
        except ValueError as exc:
            raise CorruptData(f"{where}: {exc}") from None
        most = batch.npages * run_codec.max_page_bytes(batch.page_size)
        if raw_size > most:
            raise CorruptData(f"{where}: raw_size {raw_size} exceeds what {batch.npages} pages can encode to ({most})")
        offsets = array_of(batch, "offsets", where)
        if offsets.shape != (batch.npages + 1,):
            raise CorruptData(f"{where}: {offsets.shape[0]} offsets for {batch.npages} pages")
        if int(offsets[-1]) != raw_size:
            raise CorruptData(f"{where}: raw_size {raw_size} differs from the last offset {int(offsets[-1])}")
        return raw_size

    def _codec(self, name: str, known: tuple[str, ...], what: str, batch: Batch) -> Any:
        """The codec ``name`` (built once); CorruptData naming it if it is not one of ``known``."""
        if name not in known:
            raise CorruptData(f"{self.factory_name}: batch of epoch {batch.epoch} uses unknown {what} "
                              f"{name!r} (known: {', '.join(known)})")
        if name not in self._codecs:
            self._codecs[name] = get_codec(name)
        return self._codecs[name]
