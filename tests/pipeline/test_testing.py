"""The stage author's harness: push batches and markers through a stage or a chain, pull what comes out."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch import PAGES, Flag, PageKind
from pipeline.errors import CorruptData
from pipeline.testing import Harness, layout_batch, pages_batch
from stages.basic import Identity, TestSource
from stages_for_tests import Warner


def test_pages_batch_fills_recognisable_non_zero_pages_or_takes_data():
    batch = pages_batch([3, 300], epoch=2)
    assert batch.format == PAGES and batch.epoch == 2 and batch.data.shape == (2, 4096)
    assert batch.data[0, 0] == 4 and batch.data[1, 0] == 300 % 255 + 1
    assert batch.kinds.tolist() == [PageKind.NORMAL] * 2
    batch = pages_batch([1], np.zeros(64, np.uint8), page_size=64, kinds=[PageKind.RAW])
    assert batch.data.shape == (1, 64) and not batch.data.any() and batch.kinds.tolist() == [PageKind.RAW]
    batch.validate()


def test_layout_batch_takes_tuples_or_dicts():
    batch = layout_batch([("heap", 0x1000, 0, 4), {"name": "stack", "start": 0x9000, "first_page": 4, "npages": 2}])
    assert batch.flags == Flag.LAYOUT and batch.meta["regions"][0] == {
        "name": "heap", "start": 0x1000, "first_page": 0, "npages": 4}


def test_a_chain_passes_batches_stamps_epoch_ends_and_keeps_statistics():
    with Harness(Identity(name="a"), Warner(name="b")) as harness:
        assert len(harness.push(pages_batch([1, 2]), pages_batch([3]))) == 2
        (end,) = harness.end_epoch()
        assert end.flags == Flag.EPOCH_END and end.meta["pages"] == 3
        assert harness.layout([("r", 0, 0, 8)])[0].flags == Flag.LAYOUT
        assert harness.end_stream()[0].flags == Flag.END_OF_STREAM
    assert len(harness.outputs) == 5
    assert harness.warnings == ["first batch of epoch 1"]
    stats = harness.statistics()
    assert stats["a"]["pages_in"] == 3 and stats["b"]["pages_out"] == 3 and stats["b"]["counters"] == {"warned": 1}


def test_a_source_produces_and_stage_errors_surface_unchanged():
    harness = Harness(TestSource(epochs=2, pages=10, batch_pages=4))
    out = harness.produce()
    assert sum(b.npages for b in out) == 20 and out[-1].flags == Flag.END_OF_STREAM
    with Harness(Identity()) as harness, pytest.raises(TypeError, match="not a source"):
        harness.produce()
    from stages.classify import Classify
    with Harness(Classify()) as harness, pytest.raises(CorruptData, match="classify: .*1 kinds for 2 pages"):
        harness.push(pages_batch([1, 2]).with_(kinds=np.zeros(1, np.uint8)))
