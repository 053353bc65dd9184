"""Per-epoch statistics: stages record through their context, the runtime adds bytes per epoch, the
supervisor merges workers and derives the pipeline's series and distributions."""
from __future__ import annotations

import json

import pytest

from pipeline import Pipeline
from pipeline.cli import main
from pipeline.epoch_stats import EpochSeries, distribution


def test_series_merge_workers_by_sum_and_durations_by_maximum():
    series = EpochSeries(wire_links=[("frame0", "bytes_out")])
    series.add("src0", [[1, {"pause_seconds": 0.002, "dirty_bytes": 8192, "dirty_pages": 2}]])
    series.add("zstd0", [[1, {"bytes_out": 100, "wait_seconds": 0.004}]])
    series.add("zstd0", [[1, {"bytes_out": 50, "wait_seconds": 0.001}]])   # a second worker
    series.add("frame0", [[1, {"bytes_out": 2048}], [2, {"bytes_out": 10}]])
    assert series.stages["zstd0"][1] == {"bytes_out": 150, "wait_seconds": 0.004}
    pipeline = series.pipeline()
    assert pipeline[1]["wire_bytes"] == 2048 and pipeline[1]["ratio"] == 4.0
    assert pipeline[1]["pause_seconds"] == 0.002 and "bytes_out" not in pipeline[1]
    assert "ratio" not in pipeline[2]          # nothing dirty recorded for epoch 2
    data = series.to_json()
    assert data["pipeline"]["epoch"] == [1, 2] and data["pipeline"]["dirty_pages"] == [2, None]
    assert data["distributions"]["stages"]["zstd0"]["bytes_out"]["max"] == 150


def test_series_skip_malformed_records_and_keep_the_newest_epochs():
    series = EpochSeries(limit=3)
    series.add("s", [["x", {}], [1], [2, "not a dict"], None, [3, {"a": "text", "b": float("nan"), "c": 1}]])
    series.add("s", "not a list")
    assert series.stages["s"] == {3: {"c": 1}}
    series.add("s", [[epoch, {"c": 1}] for epoch in range(4, 9)])
    assert sorted(series.stages["s"]) == [6, 7, 8] and series.dropped == 3


def test_distribution_median_and_percentiles():
    found = distribution(float(value) for value in range(1, 101))
    assert found["count"] == 100 and found["median"] == 50.5 and found["max"] == 100.0
    assert 90 <= found["p90"] <= 91 and 99 <= found["p99"] <= 100
    assert distribution([]) == {"count": 0}


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_a_run_records_every_stage_per_epoch_and_what_stages_add(mode):
    result = Pipeline.parse("test-src epochs=5 pages=64 ! epoch-noter workers=2 ! null-sink").run(mode=mode, timeout=60)
    series = result.epochs
    assert set(series.stages) == {"test-src0", "epoch-noter0", "null-sink0"}
    for stage in ("test-src0", "null-sink0"):
        assert sorted(series.stages[stage]) == [0, 1, 2, 3, 4]
    pages_in = sum(values["pages_in"] for values in series.stages["null-sink0"].values())
    assert pages_in == result.totals("null-sink0")["pages_in"] == 5 * 64
    noted = series.stages["epoch-noter0"]
    assert all(noted[epoch]["noted"] == 2 for epoch in range(5))           # both workers saw each epoch end
    assert all(noted[epoch]["wait_seconds"] == 0.002 for epoch in range(5))  # the longer of the two
    assert result.to_json()["epochs"]["distributions"]["pipeline"]["noted"]["median"] == 2


def test_launch_stats_json_carries_series_and_distributions(tmp_path, capsys):
    stats = tmp_path / "stats.json"
    assert main(["launch", "--stats-json", str(stats), "test-src epochs=3 ! epoch-noter ! null-sink"]) == 0
    epochs = json.loads(stats.read_text())["epochs"]
    assert epochs["pipeline"]["epoch"] == [0, 1, 2] and epochs["pipeline"]["noted"] == [1, 1, 1]
    assert set(epochs["distributions"]["pipeline"]["wait_seconds"]) == {"count", "median", "p90", "p99", "max"}
    summary = capsys.readouterr().out
    assert "per epoch (3 epochs)" in summary and "epoch-noter0 out" in summary
