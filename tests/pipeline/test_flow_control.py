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
