"""Merging stages never changes results: subclasses of the fusable built-ins and a user's stage between every
pair of built-ins give the same stream and the same per-element statistics fused and unfused."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pytest

from pipeline.batch import ANY, KIND_RAW, Batch
from pipeline.pipeline import Pipeline
from pipeline.stage import Stage
from stages.classify import Classify
from stages.entropy import Zstd
from stages.framer import Frame
from stages.rle import RunLengthEncode
from stages.transport import FileSink, TraceSource, write_trace_from_npz
from stages.xor_delta import XorDelta

PAGE = 4096
COMPARED = ("workers", "batches_in", "pages_in", "bytes_in", "batches_out", "pages_out", "bytes_out", "counters")


class AllRawClassify(Classify):
    """Every page RAW: what fusion used to lose by rebuilding a plain classify."""

    def process(self, batch: Batch) -> Iterable[Batch]:
        (out,) = super().process(batch)
        out.kinds[:] = KIND_RAW
        yield out


class TinyCacheXorDelta(XorDelta):
    """A one-page cache, whatever the properties say."""

    def cache_slots(self, page_size: int) -> int:
        return 1


class TaggingRle(RunLengthEncode):
    """rle that counts what it encodes under a counter of its own."""

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.counters["tagged"] = self.counters.get("tagged", 0) + batch.npages
        yield from super().process(batch)


class Tap(Stage):
    """A user's pass-through stage: counts pages of any format."""

    factory_name = "tap"
    input_caps = (ANY,)
    output_caps = ANY

    def output_format(self, input_format: str | None) -> str | None:
        return input_format

    def process(self, batch: Batch) -> Iterable[Batch]:
        self.counters["pages"] = self.counters.get("pages", 0) + batch.npages
        yield batch


BUILT_INS = (Classify, XorDelta, RunLengthEncode)
VARIANTS = {  # name -> (classify, xor-delta, rle classes, position of a Tap after the source and each stage or None)
    "built-in": (Classify, XorDelta, RunLengthEncode, None),
    "classify subclass": (AllRawClassify, XorDelta, RunLengthEncode, None),
    "xor-delta subclass": (Classify, TinyCacheXorDelta, RunLengthEncode, None),
    "rle subclass": (Classify, XorDelta, TaggingRle, None),
    **{f"user stage at {at}": (Classify, XorDelta, RunLengthEncode, at) for at in range(4)},
}


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """A recorded trace whose epochs rewrite a few bytes of some pages (so deltas pay) and zero one."""
    directory = tmp_path_factory.mktemp("fusion")
    rng = np.random.default_rng(7)
    memory = rng.integers(0, 256, (40, PAGE), dtype=np.uint8)
    arrays = {"base": memory.copy(), "region_starts": np.array([0x1000000], np.uint64),
              "region_npages": np.array([40], np.uint64)}
    for epoch in range(5):
        pages = np.sort(rng.choice(40, 12, replace=False))
        for page in pages:
            memory[page, rng.integers(0, PAGE, 8)] = rng.integers(0, 256, 8, dtype=np.uint8)
        memory[pages[0]] = 0
        arrays[f"epoch{epoch:03d}_pages"], arrays[f"epoch{epoch:03d}_data"] = pages, memory[pages]
    np.savez(directory / "memory.npz", **arrays)
    write_trace_from_npz(directory / "memory.npz", directory / "memory.trace", batch_pages=5)
    return directory / "memory.trace"


def run_chain(trace: Path, variant: str, out: Path, fuse: bool, mode: str = "inline"):
    classify, xor_delta, rle, tap_at = VARIANTS[variant]
    middle: list[Stage] = [classify(), xor_delta(cache_pages=16), rle(format="xbzrle")]
    if tap_at is not None:
        middle.insert(tap_at, Tap())
    # no heartbeat records: when they come depends on timing, and the streams are compared byte for byte
    pipeline = Pipeline.chain(TraceSource(path=str(trace), batch_pages=7), *middle, Zstd(), Frame(heartbeat=0),
                              FileSink(path=str(out)))
    return pipeline, pipeline.run(mode=mode, fuse=fuse, timeout=60)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_and_unfused_give_the_same_stream_and_statistics(trace, variant, tmp_path):
    pipeline, fused = run_chain(trace, variant, tmp_path / "fused", fuse=True)
    _, apart = run_chain(trace, variant, tmp_path / "apart", fuse=False)
    assert (tmp_path / "fused").read_bytes() == (tmp_path / "apart").read_bytes()
    elements = [stage.name for stage in pipeline.elements]
    for element in elements:
        for key in COMPARED:
            assert fused.totals(element)[key] == apart.totals(element)[key], (element, key)
    fused_nodes = {fused.totals(element).get("fused_as") for element in elements} - {None}
    swallowed = [stage.name for stage in pipeline.elements if type(stage) not in BUILT_INS + (TraceSource,)
                 and stage.factory_name in ("classify", "xor-delta", "rle", "tap")]
    assert not any(name in node.split("+") for node in fused_nodes for name in swallowed), fused_nodes
    if variant == "built-in":   # the built-ins do fuse, and each still reports under its own name
        assert fused_nodes == {"trace-src0+classify0+xor-delta0+rle0"}


def test_the_subclasses_change_the_stream(trace, tmp_path):
    """So the matrix above would catch a subclass rebuilt as its built-in parent."""
    run_chain(trace, "built-in", tmp_path / "built-in", fuse=False)
    for variant in ("classify subclass", "xor-delta subclass"):
        _, result = run_chain(trace, variant, tmp_path / variant, fuse=False)
        assert (tmp_path / variant).read_bytes() != (tmp_path / "built-in").read_bytes(), variant
    _, result = run_chain(trace, "rle subclass", tmp_path / "rle", fuse=True)
    assert result.totals("rle0")["counters"]["tagged"] > 0


@pytest.mark.parametrize("variant", ["built-in", "classify subclass", "user stage at 1"])
def test_process_mode_fused_and_unfused_agree(trace, variant, tmp_path):
    _, fused = run_chain(trace, variant, tmp_path / "fused", fuse=True, mode="process")
    _, apart = run_chain(trace, variant, tmp_path / "apart", fuse=False, mode="process")
    assert (tmp_path / "fused").read_bytes() == (tmp_path / "apart").read_bytes()
    for element in ("trace-src0", "classify0", "xor-delta0", "rle0"):
        for key in COMPARED:
            assert fused.totals(element)[key] == apart.totals(element)[key], (element, key)
