"""Backpressure: a slow stage slows its producer; bytes in flight stay bounded."""
from __future__ import annotations

import numpy as np

from pipeline.pipeline import Pipeline

BATCH_BYTES = 16 * 4096


def test_slow_consumer_holds_its_producer_within_max_inflight(tmp_path):
    counter = tmp_path / "counter"
    np.zeros(1, dtype=np.int64).tofile(counter)
    p = Pipeline.parse(f"counting-src counter-file={counter} epochs=1 pages=1600 batch-pages=16 "
                       f"! lagging-sink counter-file={counter} delay=2ms")
    result = p.run(mode="process", max_inflight=4 * BATCH_BYTES, timeout=60)
    sink = result.statistics[("lagging-sink0", 0)]["counters"]
    assert sink["consumed"] == 100
    # at most max-inflight (4 batches) unacknowledged, plus the batch being taken and one being produced
    assert sink["max_ahead"] <= 6


def test_small_batches_fanned_out_and_in_again_all_arrive_with_their_epochs():
    # 1-page batches travel in the hops themselves (not the rings): more than a socket buffer is in flight, so
    # writes are queued and resumed; a worker never waits on one full hop while another holds an epoch's end.
    result = Pipeline.parse("test-src epochs=4 pages=3000 batch-pages=1 pattern=counter ! identity "
                            "! identity workers=2 ! null-sink").run(mode="process", timeout=120)
    counters = result.totals("null-sink0")["counters"]
    assert counters["pages"] == 12000 and counters["epochs"] == 4


def test_a_back_to_back_source_whose_epoch_exceeds_max_inflight_sends_what_it_holds_before_waiting_for_credit():
    # 1 MiB batches leave through the ring as references, which such a source holds until its epoch ends; an
    # epoch of 16 MiB against 2 MiB in flight must not wait for credit on references never sent.
    result = Pipeline.parse("back-to-back-src epochs=2 pages=4096 batch-pages=256 pattern=counter ! identity "
                            "! null-sink").run(mode="process", max_inflight="2MiB", timeout=60)
    counters = result.totals("null-sink0")["counters"]
    assert counters["pages"] == 8192 and counters["epochs"] == 2
