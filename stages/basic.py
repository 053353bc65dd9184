"""Plumbing and test stages: identity, tee, null-sink, and the synthetic source test-src."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from pipeline.batch import ANY, PAGES, Batch, Flag, PageKind
from pipeline.stage import Property, Stage

from .common.pages import combine_digests, digest_pages

_MASK64 = (1 << 64) - 1  # combine_digests sums mod 2**64: an epoch's digest is the sum over its batches
PATTERNS = ("counter", "zeros", "random")


class Identity(Stage):
    """Pass every batch through unchanged."""

    factory_name = "identity"
    description = "Pass batches through unchanged (any format)"
    input_caps = (ANY,)
    output_caps = ANY

    def output_format(self, input_format: str | None) -> str | None:
        return input_format

    def process(self, batch: Batch) -> Iterable[Batch]:
        yield batch


class Tee(Identity):
    """Fan out: every linked branch receives every batch (``tee name=t ! a  t. ! b``)."""

    factory_name = "tee"
    description = "Send every batch to each linked branch"


class NullSink(Stage):
    """Consume and count batches."""

    factory_name = "null-sink"
    description = "Discard batches, counting pages and bytes"
    input_caps = (ANY,)
    output_caps = None

    def start(self, context) -> None:
        super().start(context)
        self.counters.update(pages=0, bytes=0, epochs=0)

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.counters["pages"] += batch.npages
        self.counters["bytes"] += batch.nbytes
        return ()

    def control(self, batch: Batch) -> Iterable[Batch]:
        if batch.flags & Flag.EPOCH_END:
            self.counters["epochs"] += 1
        return ()


class TestSource(Stage):
    """Synthetic PAGES: LAYOUT, then per epoch ``pages`` pages in batches plus EPOCH_END, then END_OF_STREAM.

    Every epoch writes pages 0..pages-1. Patterns: ``counter`` (page number and
    epoch in the first 16 bytes, rest zero), ``zeros`` (one shared read-only
    buffer: no per-batch cost, for throughput tests), ``random`` (seeded bytes).
    """

    __test__ = False  # not a pytest test class despite its name

    factory_name = "test-src"
    description = "Synthetic source of PAGES batches for tests and benchmarks"
    input_caps = ()
    output_caps = PAGES

    epochs = Property("int", 3, "Epochs (checkpoints) to emit", minimum=0)
    pages = Property("int", 1024, "Pages written per epoch", minimum=0)
    batch_pages = Property("int", 256, "Pages per batch", minimum=1)
    page_size = Property("size", 4096, "Bytes per page", minimum=16, maximum=1 << 24)
    pattern = Property("choice", "counter", "Page contents", choices=PATTERNS)
    seed = Property("int", 0, "Seed of the random pattern", minimum=0)
    resync = Property("bool", False, "Like a tracker: epochs count from 1, the first is RESYNC (every page whole) "
                                     "and each epoch end carries its pages' digest, so that a replica-sink accepts them")

    def produce(self) -> Iterator[Batch]:
        sequence = 0
        regions = [{"name": "test", "start": 0, "first_page": 0, "npages": self.pages}]
        yield Batch.control(Flag.LAYOUT, 0, page_size=self.page_size, sequence=sequence, regions=regions)
        zeros = self.context.allocate((min(self.batch_pages, self.pages), self.page_size), np.uint8)
        zeros.fill(0)  # written once (in shared memory in process mode): every batch refers to it
        zeros.flags.writeable = False
        first_epoch = 1 if self.resync else 0   # like a tracker: a replica numbers checkpoints from 1
        for epoch in range(first_epoch, first_epoch + self.epochs):
            flags = Flag.RESYNC if self.resync and epoch == first_epoch else Flag.NONE
            digest = 0
            for first in range(0, self.pages, self.batch_pages):
                sequence += 1
                page_numbers = np.arange(first, min(first + self.batch_pages, self.pages), dtype=np.uint64)
                count = page_numbers.shape[0]
                data = self._contents(page_numbers, epoch, zeros[:count])
                if self.resync:
                    digest = (digest + combine_digests(page_numbers, digest_pages(data))) & _MASK64
                yield Batch(format=PAGES, epoch=epoch, sequence=sequence, page_size=self.page_size, flags=flags,
                            page_numbers=page_numbers, kinds=np.full(count, PageKind.NORMAL, dtype=np.uint8),
                            data=data)
            sequence += 1
            meta = {"pages": self.pages, **({"digest": digest} if self.resync else {})}
            yield Batch.control(Flag.EPOCH_END | flags, epoch, page_size=self.page_size, sequence=sequence, **meta)
        sequence += 1
        yield Batch.control(Flag.END_OF_STREAM, max(first_epoch + self.epochs - 1, 0), page_size=self.page_size, sequence=sequence)

    def _contents(self, page_numbers: np.ndarray, epoch: int, zeros: np.ndarray) -> np.ndarray:
        if self.pattern == "zeros":
            return zeros
        if self.pattern == "random":
            generator = np.random.default_rng([self.seed, epoch, int(page_numbers[0])])
            data = self.context.allocate(zeros.shape, np.uint8)
            data[...] = generator.integers(0, 256, size=zeros.shape, dtype=np.uint8)
            return data
        data = self.context.allocate(zeros.shape, np.uint8)
        data[:, 16:] = 0
        data[:, :8] = page_numbers.astype("<u8").view(np.uint8).reshape(-1, 8)
        data[:, 8:16] = np.frombuffer(int(epoch).to_bytes(8, "little"), dtype=np.uint8)
        return data
