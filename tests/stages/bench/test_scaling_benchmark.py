"""The scaling benchmark runs end to end on a tiny synthetic trace and reports every figure (never judged on speed)."""
import json

import numpy as np

from stages.bench import scaling


def test_scaling_benchmark_reports_speedup_efficiency_and_cpu_per_stage(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert scaling.main(["--workers", "2", "--pages", "1024", "--rounds", "1", "--quick", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    results = figures["results"]
    assert [r["workers"] for r in results] == [1, 2]          # workers=1 is always run: the baseline
    assert results[0]["speedup"] == 1.0 and results[1]["efficiency"] == results[1]["speedup"] / 2
    assert results[0]["dirty_bytes"] == results[1]["dirty_bytes"] > 0
    assert results[1]["processes"] > results[0]["processes"]
    for result in results:
        assert "supervisors" in result["cpu_per_gb"] and any(name.startswith("zstd") for name in result["cpu_per_gb"])
    assert results[1]["workers_by_stage"]["frame0+zmq-sink0"] == 2       # lanes: two framing and sending workers
    assert results[1]["workers_by_stage"]["zmq-src0+deframe0"] == 2
    out = capsys.readouterr().out
    assert "speedup" in out
    predicted = figures["predicted_not_measured"]
    assert [p["cores"] for p in predicted] == [c for c in (4, 8, 16) if c > figures["cores"]]
    if predicted:
        assert "PREDICTION, not measured" in out and all(p["gbps"] > 0 and p["limited_by"] for p in predicted)


def test_the_prediction_scales_each_stage_by_its_workers_within_the_cores():
    measured = {"workers": 2, "preload_cpu_per_gb": 0.5,
                "workers_by_stage": {"trace-src0": 1, "zstd0": 2, "frame0+zmq-sink0": 2, "null-sink0": 1},
                "cpu_per_gb": {"trace-src0": 0.6, "zstd0": 1.0, "frame0+zmq-sink0": 0.5, "null-sink0": 0.05,
                               "supervisors": 0.05}}
    predicted = scaling.predict(measured, 4)
    assert predicted["limited_by"] == "all cores" and abs(predicted["gbps"] - 4 / (0.1 + 1.0 + 0.5 + 0.05 + 0.05)) < 1e-9
    wide = scaling.predict(measured, 64)   # trace-src's 0.1 s/GB after its preload: one process, 10 GB/s at most
    assert wide["limited_by"] == "trace-src0" and abs(wide["gbps"] - 10.0) < 1e-6


def test_synthetic_trace_epochs_change_exactly_the_pages_they_name():
    trace = scaling.synthetic_trace(pages=64, epochs=3, dirty=8)
    current = trace.base.copy()
    assert 0.2 < np.count_nonzero(current.view(np.uint64)) / current.view(np.uint64).size < 0.4  # heap-like
    for numbers, data in trace.epochs:
        rows = numbers.astype(np.intp)
        assert len(rows) == 8 and (data != current[rows]).any(axis=1).all()
        current[rows] = data


def test_worker_counts_double_up_to_the_cores():
    assert scaling.worker_counts(16) == [1, 2, 4, 8, 16]
    assert scaling.worker_counts(6) == [1, 2, 4, 6]
    assert scaling.worker_counts(1) == [1]


def test_the_pessimistic_prediction_lets_cpu_per_gb_grow_with_the_workers_as_measured():
    one = {"workers": 1, "preload_cpu_per_gb": 1.0, "cpu_per_gb": {"a": 2.0, "b": 0.5}}       # 1.5 s/GB
    two = {"workers": 2, "preload_cpu_per_gb": 1.0, "cpu_per_gb": {"a": 2.5, "b": 1.0}}       # 2.5 s/GB
    predicted = scaling.predict_growing(one, two, 8)
    assert predicted["cpu_per_gb"] == 1.5 + 1.0 * 7 and predicted["gbps"] == 8 / 8.5
    assert scaling.predict_growing(two, one, 8)["cpu_per_gb"] == 2.5     # a fall is not extrapolated
