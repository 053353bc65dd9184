"""The receiver benchmark runs on tiny data and reports what it promises (never asserting on speed)."""
from __future__ import annotations

import re

from stages.bench.receiver import main


def test_receiver_benchmark_reports_apply_throughput_for_both_fsync_settings(capsys):
    assert main(["--data", "synthetic", "--synthetic-pages", "512", "--epochs", "3", "--repeat", "1",
                 "--skip", "latency"]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"fsync=(false|true)\s+([0-9.]+) GB/s .* 2 epochs.*target >= 1.0 GB/s: (met|MISSED)", out)
    assert [line[0] for line in lines] == ["false", "true"]
    assert all(float(line[1]) > 0 for line in lines)


def test_receiver_benchmark_reports_ack_latency_of_a_verified_demo(capsys):
    assert main(["--skip", "apply", "--seconds", "1", "--rate", "20", "--size", "2MiB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"checkpoint -> ack median [0-9.]+ ms, p90 [0-9.]+ ms over \d+ epochs", out)
    assert re.search(r"pause median [0-9.]+ ms.*ratio [0-9.]+", out)
    assert re.search(r"\d+ checkpoints, [0-9.]+/s \(target 20/s: (met|MISSED)\)", out)
    assert "replica identical: True" in out
