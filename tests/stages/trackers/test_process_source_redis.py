"""process-src mode=uffd on a real server: a live redis under redis-benchmark load replicates exactly."""
from __future__ import annotations

import os
import shutil
import signal

import pytest

from stages.bench.trackers import redis_load, start_redis
from stages.trackers.procmem import thread_states
from stages.trackers.remote_uffd import userfaultfd_descriptors
from test_process_source_uffd import assert_replica_equals_memory, replicate

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
    reason="redis-server / redis-benchmark not installed (apt-get install redis-server redis-tools; .ci/run does)")


@pytest.fixture
def loaded_redis():
    server, port = start_redis(keys=20000, value=1024)
    # a bounded key space keeps the data set near 40 MiB: the test's work does not grow with how slow the machine
    # is (1M keys grew it to 1.3 GiB and an 11 GiB stream on a loaded 2-core machine)
    load = redis_load(port, 1024, key_space=20000)
    yield server
    for process in (load, server):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_loaded_redis_replicates_exactly_at_the_stopped_end(loaded_redis, tmp_path):
    result, replica = replicate(loaded_redis.pid, tmp_path, "mode=uffd stop-at-end=true", checkpoints=20,
                                interval="25ms")
    assert set(thread_states(loaded_redis.pid)) == {"T"}
    try:
        assert assert_replica_equals_memory(replica, loaded_redis.pid) * 4096 > 20000 * 1024
        stats = result.statistics[("src", 0)]["counters"]
        assert stats["written_pages"] > 0 and stats["armed_pages"] > 5000
    finally:
        os.kill(loaded_redis.pid, signal.SIGCONT)


def test_a_loaded_redis_keeps_running_with_nothing_of_ours_left(loaded_redis, tmp_path):
    replicate(loaded_redis.pid, tmp_path, "mode=uffd", checkpoints=10)
    assert userfaultfd_descriptors(loaded_redis.pid) == []
    assert set(thread_states(loaded_redis.pid)) <= set("RS")
    assert loaded_redis.poll() is None
