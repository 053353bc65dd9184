"""The Prometheus endpoint: the run's counters and per-epoch histograms, scraped over loopback."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.errors import ConfigError
from pipeline.metrics import MetricsExporter, parse_metrics_address
from stages.apps.demo import free_tcp_endpoint

pytest.importorskip("prometheus_client")
PAGEPIPE = str(Path(sys.executable).with_name("pagepipe"))


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_scraped_metrics_hold_stage_counters_and_epoch_histograms(tmp_path):
    exporter = MetricsExporter("127.0.0.1:0")
    try:
        result = Pipeline.parse(
            "workload-src kind=kv size=1MiB seconds=1s rate=40 ! classify ! xor-delta ! rle ! frame ! deframe ! "
            f"decode ! replica-sink path={tmp_path / 'r'} fsync=false").run(mode="inline", on_message=exporter,
                                                                           timeout=120)
        samples = _scrape(exporter.port)
    finally:
        exporter.close()
    epochs = len(result.epochs.pipeline())
    assert samples['pagepipe_stage_pages_out_total{stage="workload-src0"}'] == result.totals("workload-src0")["pages_out"]
    assert samples['pagepipe_stage_bytes_in_total{stage="replica-sink0"}'] > 0
    assert samples['pagepipe_epoch_pause_seconds_count{stage="workload-src0"}'] == epochs
    assert samples['pagepipe_epoch_commit_latency_seconds_count{stage="replica-sink0"}'] == epochs
    assert samples['pagepipe_epoch_commit_latency_seconds_bucket{le="+Inf",stage="replica-sink0"}'] == epochs
    assert samples['pagepipe_epochs_total{stage="workload-src0"}'] == epochs


def test_launch_serves_metrics_while_it_runs():
    port = int(free_tcp_endpoint().rpartition(":")[2])
    endpoint = free_tcp_endpoint()
    launch = subprocess.Popen([PAGEPIPE, "launch", "--metrics-port", str(port), f"zmq-src endpoint={endpoint} insecure=true ! null-sink"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        samples = None
        while samples is None and time.monotonic() < deadline:
            try:
                samples = _scrape(port)
            except OSError:
                time.sleep(0.2)
        assert samples is not None and "pagepipe_warnings_total" in samples
    finally:
        launch.terminate()
        launch.wait(timeout=30)


def test_metrics_address_is_checked():
    assert parse_metrics_address("9464") == ("127.0.0.1", 9464)
    assert parse_metrics_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    with pytest.raises(ConfigError, match="--metrics-port 'http'"):
        parse_metrics_address("http")
