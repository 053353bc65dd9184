"""An optional Prometheus endpoint (``pagepipe launch --metrics-port 9464``) with the run's counters and
per-epoch latency histograms, through the standard client library (``pip install 'pagepipe[metrics]'``).

``MetricsExporter`` is a bus listener: counters come from the latest statistics of every worker
(summed per stage, read when scraped), histograms from the per-epoch records
(pipeline.epoch_stats) as they arrive. It serves on its own registry, so several runs in one
process do not mix.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

from .bus import Message, stage_totals
from .errors import ConfigError

STAGE_COUNTERS = (
    ("batches_in", "Batches a stage took in"), ("pages_in", "Pages a stage took in"),
    ("bytes_in", "Bytes a stage took in"), ("batches_out", "Batches a stage sent on"),
    ("pages_out", "Pages a stage sent on"), ("bytes_out", "Bytes a stage sent on"),
    ("busy_seconds", "Seconds a stage spent in its own code"), ("cpu_seconds", "CPU seconds of a stage's processes"),
)
EPOCH_HISTOGRAMS = (
    ("pause_seconds", "Checkpoint pause (the program stopped)"),
    ("commit_latency_seconds", "Checkpoint to commit at the replica"),
    ("ack_latency_seconds", "Checkpoint to acknowledgement at the sender"),
)
EPOCH_COUNTERS = (("epochs", "Epochs checkpointed or committed"), ("resync", "Resync epochs"),
                  ("discarded", "Epochs discarded"))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``9464`` (loopback) or ``HOST:PORT``; ConfigError naming the word."""
    host, _, port = str(text).rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-port {text!r}: expected a port (9464; 0 picks a free one) or HOST:PORT "
                          "(0.0.0.0:9464)")
    return host or "127.0.0.1", int(port)


class MetricsExporter:
    """Serves the run's metrics on http://HOST:PORT/metrics while it runs."""

    def __init__(self, address: str):
        try:
            from prometheus_client import CollectorRegistry, Histogram, start_http_server
        except ImportError:
            raise ConfigError("--metrics-port needs the Prometheus client library: "
                              "pip install 'pagepipe[metrics]' (or prometheus_client)") from None
        host, port = parse_metrics_address(address)
        self._lock = threading.Lock()
        self.statistics: dict[tuple[str, int], dict[str, Any]] = {}
        self.epoch_counts: dict[tuple[str, str], float] = {}
        self.warnings = 0
        self.registry = CollectorRegistry()
        self.histograms = {key: Histogram(f"pagepipe_epoch_{key}", text, ["stage"], registry=self.registry,
                                          buckets=LATENCY_BUCKETS) for key, text in EPOCH_HISTOGRAMS}
        self.registry.register(self)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {address}: cannot listen on {host}:{port} ({exc.strerror})") from None
        self.port = self.server.server_address[1]

    def __call__(self, message: Message) -> None:
        if message.kind == "stats":
            with self._lock:
                self.statistics[(message.stage, message.worker)] = message.fields
        elif message.kind == "warning":
            with self._lock:
                self.warnings += 1
        elif message.kind == "epochs" and isinstance(message.fields.get("records"), list):
            self._observe(message.stage, message.fields["records"])

    def _observe(self, stage: str, records: list) -> None:
        with self._lock:
            for record in records:
                values = record[1] if isinstance(record, list) and len(record) == 2 else None
                if not isinstance(values, dict):
                    continue
                for key, histogram in self.histograms.items():
                    value = values.get(key)
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                        histogram.labels(stage).observe(value)
                for key in ("resync", "discarded"):
                    if values.get(key):
                        self.epoch_counts[(stage, key)] = self.epoch_counts.get((stage, key), 0) + 1
                if "pause_seconds" in values or "commit_latency_seconds" in values:
                    self.epoch_counts[(stage, "epochs")] = self.epoch_counts.get((stage, "epochs"), 0) + 1

    def collect(self) -> Iterator[Any]:
        """Called by the client library at each scrape: counters from the latest statistics."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        with self._lock:
            totals = stage_totals(self.statistics)
            epoch_counts = dict(self.epoch_counts)
            warnings = self.warnings
        for key, text in STAGE_COUNTERS:
            family = CounterMetricFamily(f"pagepipe_stage_{key}", text, labels=["stage"])
            for stage, total in totals.items():
                family.add_metric([stage], float(total.get(key, 0)))
            yield family
        workers = GaugeMetricFamily("pagepipe_stage_workers", "Workers of a stage", labels=["stage"])
        queued = GaugeMetricFamily("pagepipe_stage_queue_bytes", "Bytes in flight to a stage's next", labels=["stage"])
        for stage, total in totals.items():
            workers.add_metric([stage], float(total["workers"]))
            queued.add_metric([stage], float(total.get("queue_bytes", 0)))
        yield workers
        yield queued
        for key, text in EPOCH_COUNTERS:
            family = CounterMetricFamily(f"pagepipe_{key}", text, labels=["stage"])
            for (stage, name), count in epoch_counts.items():
                if name == key:
                    family.add_metric([stage], count)
            yield family
        yield CounterMetricFamily("pagepipe_warnings", "Warnings on the bus", value=float(warnings))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
