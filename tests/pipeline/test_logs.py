"""Without a terminal, launch and stage write a status line per interval and a line per event
(text or JSON lines); a waiting receiver says what it waits for; workers carry process titles."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline import Pipeline
from pipeline.bus import Message
from pipeline.logs import RunLog
from stages.apps.demo import free_tcp_endpoint

PAGEPIPE = str(Path(sys.executable).with_name("pagepipe"))


def _pagepipe(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PAGEPIPE, *arguments], capture_output=True, text=True, timeout=timeout)


def test_launch_without_a_terminal_writes_status_lines_with_epoch_statistics():
    result = _pagepipe("launch", "--stats-interval", "300ms",
                       "workload-src kind=kv size=1MiB seconds=3s rate=40 ! classify ! xor-delta ! rle ! frame ! null-sink")
    assert result.returncode == 0, result.stderr
    status = [line for line in result.stdout.splitlines() if " pagepipe status " in line]
    assert len(status) >= 2, result.stdout
    assert any("pause median" in line and "ratio" in line for line in status)
    assert "per epoch (" in result.stdout and "finished in" in result.stdout   # then the summary


def test_json_lines_are_status_events_then_a_summary():
    result = _pagepipe("launch", "--log-format", "json", "--stats-interval", "300ms",   # records come once a second
                       "workload-src kind=kv size=1MiB seconds=6s rate=40 ! classify ! xor-delta ! rle ! frame ! null-sink")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {line["type"] for line in lines[:-1]} <= {"status", "event"} and lines[-1]["type"] == "summary"
    # a status line may come before the tracker's records of its epochs arrive: look for one that has them
    assert any(line["type"] == "status" and line["new_epochs"] > 0
               and line["epochs"].get("pause_seconds", {}).get("count", 0) > 0 for line in lines)
    assert lines[-1]["epochs"]["distributions"]["pipeline"]["pause_seconds"]["p99"] > 0


def test_a_waiting_receiver_says_what_it_waits_for_and_then_that_a_sender_connected(tmp_path):
    endpoint = free_tcp_endpoint()
    receiver = subprocess.Popen([PAGEPIPE, "launch", "--stats-interval", "500ms",
                                 f"zmq-src endpoint={endpoint} insecure=true ! deframe ! decode ! replica-sink path={tmp_path / 'r'}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        sender = _pagepipe("launch", f"test-src epochs=3 ! frame ! zmq-sink endpoint={endpoint} insecure=true")
        assert sender.returncode == 0, sender.stderr
        out, err = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
        receiver.wait()
    assert receiver.returncode == 0, err
    assert f"waiting: zmq-src0[0]: waiting for a sender on {endpoint}" in out
    assert any(" pagepipe status " in line and "waiting for a sender" in line for line in out.splitlines())
    assert f"connected: zmq-src0[0]: receiving from a sender on {endpoint}" in out
    assert "resync: replica-sink0[0]" not in out   # no ack channel: no resync requests


def test_events_and_warnings_are_written_as_they_are_never_as_markup():
    lines: list[str] = []
    log = RunLog(interval=0, write=lines.append)
    log(Message("warning", "replica-sink0", 0, {"message": "epoch 3 discarded :x: [bold]no[/bold]",
                                                  "event": "discarded", "epoch": 3}))
    log(Message("error", "zstd0", 1, {"reason": "CorruptData: bad [red]frame[/red]", "traceback": "..."}))
    assert lines[0].endswith("discarded: replica-sink0[0]: epoch 3 discarded :x: [bold]no[/bold]")
    assert lines[1].endswith("failure: zstd0[1]: CorruptData: bad [red]frame[/red]")


def test_worker_processes_carry_the_stage_worker_and_pipeline_in_their_title():
    endpoint = free_tcp_endpoint()
    handle = Pipeline.parse(f"zmq-src endpoint={endpoint} insecure=true ! identity workers=2 ! null-sink").start(
        mode="process", name="title-test")
    try:
        wanted = {"pagepipe: identity0 worker 1/2 of title-test", "pagepipe: identity0 worker 2/2 of title-test",
                  "pagepipe: null-sink0 worker 1/1 of title-test", "pagepipe: zmq-src0 worker 1/1 of title-test"}
        deadline = time.monotonic() + 60
        titles: set[str] = set()
        while titles != wanted and time.monotonic() < deadline:
            titles = set()
            for process in handle._execution.processes.values():
                try:
                    titles.add(Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0].decode())
                except (OSError, TypeError):
                    pass
            time.sleep(0.1)
        assert titles == wanted
        found = subprocess.run(["pgrep", "-f", "pagepipe: identity0 worker .* of title-test"],
                               capture_output=True, text=True).stdout.split()
        assert sorted(map(int, found)) == sorted(p.pid for k, p in handle._execution.processes.items()
                                                 if k[0] == "identity0")
    finally:
        handle.stop()


def test_stage_without_a_terminal_writes_status_lines_while_it_waits(tmp_path):
    inputs, outputs = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"
    stage = subprocess.Popen([PAGEPIPE, "stage", "identity", "--input", inputs, "--output", outputs,
                              "--stats-interval", "300ms"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)     # a few intervals even when starting the interpreter takes seconds on a loaded machine
    finally:
        stage.terminate()
        out, _ = stage.communicate(timeout=30)
    assert sum(" pagepipe status " in line for line in out.splitlines()) >= 3


def test_demo_without_a_terminal_writes_status_lines_and_events(tmp_path):
    result = _pagepipe("demo", "--seconds", "2", "--size", "2MiB", "--stats-interval", "500ms",
                       "--replica", str(tmp_path / "replica"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(" pagepipe status " in line and "ack median" in line for line in lines)
    assert any("connected: zmq-src0[0]: receiving from a sender" in line for line in lines)
    assert "replica vs source, byte for byte: identical" in result.stdout


def test_a_sender_without_receiver_says_what_it_waits_for_then_fails_in_one_line():
    endpoint = free_tcp_endpoint()
    result = _pagepipe("launch", f"test-src epochs=2 ! frame ! zmq-sink endpoint={endpoint} insecure=true timeout=2s")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"waiting: zmq-sink0[0]: waiting for a receiver at {endpoint}" in result.stdout
    assert f"no receiver took data at {endpoint}" in result.stderr.splitlines()[0]
