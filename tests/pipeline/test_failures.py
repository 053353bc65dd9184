"""A failing stage, a killed worker, an interrupted supervisor: everything stops, the culprit is named."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests_pipeline_support import descendants, wait_until_gone
from pipeline.errors import StageFailed
from pipeline.pipeline import Pipeline
from pipeline.process import DIRECTORY_PREFIX, SHARED_MEMORY_DIR

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "test-src epochs=4 pages=256 batch-pages=16 page-size=256"
ENDLESS = "test-src epochs=100000000 pages=64 pattern=zeros ! identity ! null-sink"


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_a_raising_stage_fails_the_run_naming_stage_worker_and_exception(mode):
    p = Pipeline.parse(f"{SOURCE} ! identity workers=2 ! fail-at at=3 workers=2 worker=1 ! null-sink")
    with pytest.raises(StageFailed) as caught:
        p.run(mode=mode, timeout=30)
    failure = caught.value
    assert (failure.stage, failure.worker) == ("fail-at0", 1)
    assert "RuntimeError: planned failure at batch 3" in failure.reason
    assert "RuntimeError" in failure.traceback


def test_a_worker_killed_by_sigkill_fails_the_run_within_five_seconds():
    p = Pipeline.parse(f"{SOURCE} ! fail-at at=2 how=sigkill ! null-sink")
    began = time.monotonic()
    with pytest.raises(StageFailed) as caught:
        p.run(mode="process", timeout=30)
    assert (caught.value.stage, caught.value.worker) == ("fail-at0", 0)
    assert "SIGKILL" in caught.value.reason
    assert time.monotonic() - began < 5


def test_a_failure_also_stops_workers_stuck_in_stage_code():
    p = Pipeline.parse(f"{SOURCE} ! fail-at at=3 ! fail-at how=hang ! null-sink")
    with pytest.raises(StageFailed) as caught:
        p.run(mode="process", timeout=30)
    assert caught.value.stage == "fail-at0"


def test_corrupt_bytes_on_an_input_socket_fail_that_stage_with_a_clear_error(tmp_path):
    endpoint = f"ipc://{tmp_path}/in"
    command = [sys.executable, "-m", "pipeline.cli", "stage", "identity", "--input", endpoint,
               "--output", f"ipc://{tmp_path}/out"]
    stage = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import zmq
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.linger = 1000
        push.connect(endpoint)
        push.send_multipart([b'{"v": 1, "arrays": {"page_numbers": [5]}}', b"\x00" * 3])
        _, errors = stage.communicate(timeout=20)
    assert stage.returncode == 1
    assert "stage 'identity' worker 0 failed: CorruptData: batch header" in errors


def start_cli(description: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "launch", description], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_workers(supervisor: subprocess.Popen, count: int) -> set[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        below = descendants(supervisor.pid)
        if len(below) >= count:
            return below
        time.sleep(0.05)
    supervisor.kill()
    raise AssertionError("the pipeline's workers did not start")


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_launch_stops_every_worker_and_exits_non_zero(signal_number):
    supervisor = start_cli(ENDLESS)
    workers = wait_for_workers(supervisor, 4)  # forkserver + 3 workers (and maybe the resource tracker)
    time.sleep(0.3)
    os.kill(supervisor.pid, signal_number)
    _, errors = supervisor.communicate(timeout=10)
    assert supervisor.returncode == 130
    assert "interrupted" in errors
    assert not wait_until_gone(workers)


def test_workers_end_when_the_supervisor_is_killed():
    supervisor = start_cli(ENDLESS)
    workers = wait_for_workers(supervisor, 4)
    supervisor.kill()
    supervisor.wait(timeout=10)
    assert not wait_until_gone(workers)


def test_a_killed_supervisor_takes_blocked_workers_the_fork_server_and_the_resource_tracker_with_it(tmp_path):
    """A source blocked in stage code (zmq-src waiting for a sender) never polls for its supervisor; the
    supervisor watch still ends it, and with the workers gone the fork server and the resource tracker
    (whose pipes they held) end too."""
    supervisor = start_cli(f"zmq-src endpoint=ipc://{tmp_path}/nobody.ipc ! identity ! null-sink")
    wait_for_workers(supervisor, 4)
    time.sleep(0.5)                                  # zmq-src is waiting in produce()
    everything = descendants(supervisor.pid)
    supervisor.kill()
    supervisor.wait(timeout=10)
    assert not wait_until_gone(everything)


def test_a_killed_fork_server_fails_the_run_and_leaves_nothing_behind(tmp_path):
    """SIGKILL of the fork server (the workers' parent): the workers die with it (PR_SET_PDEATHSIG), the
    supervisor names the failed stage and exits 1, and no process stays, not even one blocked in stage code."""
    supervisor = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "launch",
                                   f"zmq-src endpoint=ipc://{tmp_path}/nobody.ipc ! identity ! null-sink"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_workers(supervisor, 4)
    time.sleep(0.5)
    everything = descendants(supervisor.pid)
    fork_servers = [pid for pid in everything if _parent(pid) == supervisor.pid
                    and b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(fork_servers) == 1
    os.kill(fork_servers[0], signal.SIGKILL)
    _, errors = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 1 and "failed" in errors
    assert not wait_until_gone(everything)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def test_a_run_removes_the_files_a_killed_supervisor_left_behind():
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = Path(SHARED_MEMORY_DIR) / f"{DIRECTORY_PREFIX}{dead.pid}-test"
    orphan.mkdir()
    (orphan / "ring").write_bytes(b"x" * 4096)
    live = Path(SHARED_MEMORY_DIR) / f"{DIRECTORY_PREFIX}{os.getpid()}-test"
    live.mkdir()
    try:
        Pipeline.parse("test-src epochs=1 pages=1 ! null-sink").run(mode="process", timeout=30)
        assert not orphan.exists() and live.exists()
    finally:
        shutil.rmtree(orphan, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_a_script_without_a_main_guard_is_told_how_to_fix_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text('from pipeline import Pipeline\n'
                      'Pipeline.parse("test-src epochs=1 ! identity ! null-sink").run(mode="process", timeout=30)\n')
    repo = Path(__file__).resolve().parents[2]
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=60, env={**os.environ, "PYTHONPATH": str(repo)})
    assert completed.returncode != 0
    assert 'under `if __name__ == "__main__":`' in completed.stderr
