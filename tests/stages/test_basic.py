"""identity, tee, null-sink and the synthetic source test-src."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch import PAGES, Batch, Flag, PageKind
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages.basic import Identity, NullSink, Tee, TestSource


def produced(**properties) -> list[Batch]:
    source = TestSource(**properties)
    source.start(StageContext("test-src"))
    return list(source.produce())


def test_source_emits_layout_then_epochs_then_end_of_stream_with_increasing_sequence():
    batches = produced(epochs=2, pages=10, batch_pages=4, page_size=64)
    flags = [b.flags for b in batches]
    assert flags[0] == Flag.LAYOUT and flags[-1] == Flag.END_OF_STREAM
    assert batches[0].meta["regions"] == [{"name": "test", "start": 0, "first_page": 0, "npages": 10}]
    assert [b.npages for b in batches[1:5]] == [4, 4, 2, 0] and batches[4].flags == Flag.EPOCH_END
    assert batches[4].meta["pages"] == 10 and batches[4].epoch == 0 and batches[8].epoch == 1
    sequences = [b.sequence for b in batches]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    for batch in batches:
        batch.validate()
        assert batch.format == PAGES and batch.page_size == 64


def test_counter_pattern_writes_page_number_and_epoch_into_each_page():
    batches = [b for b in produced(epochs=2, pages=3, page_size=32) if not b.is_control]
    last = batches[-1]
    assert last.epoch == 1
    words = last.data.view("<u8")
    assert words[:, 0].tolist() == [0, 1, 2] and words[:, 1].tolist() == [1, 1, 1]
    assert np.all(last.kinds == PageKind.NORMAL)


def test_random_pattern_is_reproducible_by_seed_and_zeros_pattern_is_read_only():
    first = produced(epochs=1, pages=4, pattern="random", seed=7)[1].data
    again = produced(epochs=1, pages=4, pattern="random", seed=7)[1].data
    other = produced(epochs=1, pages=4, pattern="random", seed=8)[1].data
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    zeros = produced(epochs=1, pages=4, pattern="zeros")[1].data
    assert not zeros.any() and not zeros.flags.writeable


def test_bad_source_properties_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        TestSource(pattern="stripes")
    with pytest.raises(ConfigError, match="below the minimum"):
        TestSource(batch_pages=0)


@pytest.mark.parametrize("stage_class", [Identity, Tee])
def test_pass_through_stages_forward_batches_unchanged_in_their_input_format(stage_class):
    stage = stage_class()
    batch = produced(epochs=1, pages=2)[1]
    assert list(stage.handle(batch)) == [batch]
    assert stage.output_format("deltas") == "deltas" and stage.accepts("encoded")


def test_null_sink_counts_pages_bytes_and_epochs_and_emits_nothing():
    sink = NullSink()
    sink.start(StageContext("null-sink"))
    outputs = [out for batch in produced(epochs=2, pages=5, page_size=64) for out in sink.handle(batch)]
    assert outputs == []
    assert sink.counters == {"pages": 10, "bytes": 10 * (64 + 9), "epochs": 2}
