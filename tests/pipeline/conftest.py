"""Every runtime test must leave no worker process behind; the test stages are registered by name."""
from __future__ import annotations

import pytest

from pipeline import registry
from tests_pipeline_support import wait_until_gone, worker_processes

TEST_STAGES = {name: f"stages_for_tests:{cls}" for name, cls in {
    "recorder": "Recorder", "fail-at": "FailAt", "shard-checker": "ShardChecker", "counting-src": "CountingSource",
    "lagging-sink": "LaggingSink", "doubler": "Doubler", "warner": "Warner", "hoarder": "Hoarder",
    "back-to-back-src": "BackToBackSource", "epoch-noter": "EpochNoter"}.items()}


@pytest.fixture(autouse=True)
def no_worker_left_behind():
    yield
    assert not wait_until_gone(worker_processes()), "worker processes survived the test"


@pytest.fixture(autouse=True)
def test_stages_registered(monkeypatch):
    """The stages of stages_for_tests, usable by name in launch strings."""
    everything = {**registry.factories(), **TEST_STAGES}
    monkeypatch.setattr(registry, "factories", lambda: everything)
