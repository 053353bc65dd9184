"""Every runtime test must leave no worker process behind; the test stages are registered by name."""
from __future__ import annotations

import pytest

import stages_for_tests  # noqa: F401  (registers its stages: recorder, fail-at, doubler, ...)
from tests_pipeline_support import wait_until_gone, worker_processes


@pytest.fixture(autouse=True)
def no_worker_left_behind():
    yield
    assert not wait_until_gone(worker_processes()), "worker processes survived the test"
