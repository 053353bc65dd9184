"""The pagepipe command: inspect, launch (exit codes, --stats-json), stage over tcp, bench dispatch."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from pipeline.batch import Batch, Flag
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_inspect_lists_every_stage_with_a_description(capsys):
    assert main(["inspect"]) == 0
    listing = capsys.readouterr().out
    assert "test-src" in listing and "Synthetic source of PAGES batches" in listing
    assert "null-sink" in listing and "xor-delta" in listing


def test_inspect_name_shows_formats_shard_key_and_every_property(capsys):
    assert main(["inspect", "test-src"]) == 0
    text = capsys.readouterr().out
    assert "Output format   pages" in text and "Shard key       none (round-robin)" in text
    assert "page-size" in text and "16 .. 16777216" in text and "counter | zeros | random" in text


def test_inspect_unknown_name_exits_2(capsys):
    assert main(["inspect", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_launch_writes_statistics_json_and_exits_0(tmp_path):
    stats = tmp_path / "stats.json"
    assert main(["launch", "--mode", "process", "--stats-json", str(stats),
                 "test-src epochs=2 pages=64 ! identity workers=2 ! null-sink"]) == 0
    data = json.loads(stats.read_text())
    assert data["stages"]["null-sink0"]["pages_in"] == 128
    assert data["stages"]["identity0"]["workers"] == 2
    assert {w["stage"] for w in data["workers"]} == {"test-src0", "identity0", "null-sink0"}


def test_launch_exit_codes_for_a_bad_description_and_a_failing_stage(capsys):
    assert main(["launch", "test-src ! rle ! null-sink"]) == 2
    assert "^" in capsys.readouterr().err
    assert main(["launch", "--mode", "inline", "test-src ! fail-at at=1 ! null-sink"]) == 1
    assert "stage 'fail-at0' worker 0 failed: RuntimeError" in capsys.readouterr().err


def test_bench_dispatches_to_the_named_module_and_rejects_unknown_ones(capsys):
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "no benchmark named" in capsys.readouterr().err


def test_stage_subcommand_refuses_a_tcp_link_without_insecure(capsys):
    assert main(["stage", "identity", "--input", "tcp://127.0.0.1:5555", "--output", "ipc:///tmp/x"]) == 2
    assert "--input tcp://127.0.0.1:5555 is a network link without authentication" in capsys.readouterr().err


def test_stage_subcommand_runs_one_stage_between_tcp_endpoints():
    """Both ends here bind; the stage connects to both ('>' forces connect on its input)."""
    with zmq.Context() as context, context.socket(zmq.PUSH) as push, context.socket(zmq.PULL) as pull:
        push.linger = 1000
        in_port = push.bind_to_random_port("tcp://127.0.0.1")
        out_port = pull.bind_to_random_port("tcp://127.0.0.1")
        stage = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "identity", "--insecure", "--input",
                                  f">tcp://127.0.0.1:{in_port}", "--output", f"tcp://127.0.0.1:{out_port}"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pages = np.arange(3, dtype=np.uint64)
            sent = [Batch(epoch=0, page_size=64, page_numbers=pages, kinds=np.zeros(3, np.uint8),
                          data=np.full((3, 64), 7, np.uint8)),
                    Batch.control(Flag.EPOCH_END, 0, page_size=64, pages=3),
                    Batch.control(Flag.END_OF_STREAM, 0, page_size=64)]
            for batch in sent:
                push.send_multipart(batch.to_frames())
            assert pull.poll(20000)
            received = [Batch.from_frames(pull.recv_multipart()) for _ in sent]
            pull.close()        # a finished stage waits for its downstream to close its end (pipeline.worker)
            stage.wait(timeout=20)
        finally:
            stage.kill()
            stage.wait()
    assert stage.returncode == 0
    assert np.array_equal(received[0].data, sent[0].data)
    assert received[1].meta["pages"] == 3 and received[2].flags == Flag.END_OF_STREAM


def test_a_stage_process_delivers_its_end_of_stream_however_slowly_downstream_reads(tmp_path):
    """ZeroMQ drops the bytes its I/O thread has not written when a socket closes (libzmq issue 4660): a
    finished stage must not exit before its downstream took the end of the stream."""
    endpoint = f"ipc://{tmp_path}/out"
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.rcvhwm = 1
        pull.bind(endpoint)
        stage = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "test-src", "epochs=3", "pages=4096",
                                  "batch-pages=1024", "--output", endpoint],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        received: list[Batch] = []
        try:
            while pull.poll(5000):
                received.extend(Batch.bundle_from_frames(pull.recv_multipart()))
                if received[-1].flags & Flag.END_OF_STREAM:
                    break
                time.sleep(0.1)     # slowly: the stage's last messages wait in its I/O thread
            pull.close()
            stage.wait(timeout=20)
        finally:
            stage.kill()
            stage.wait()
    assert stage.returncode == 0
    assert received and received[-1].flags & Flag.END_OF_STREAM
    assert sum(batch.npages for batch in received if not batch.is_control) == 3 * 4096


def test_inspect_marks_required_properties(capsys):
    assert main(["inspect", "zmq-sink"]) == 0
    text = capsys.readouterr().out
    assert "endpoint          endpoint  required" in text
    assert main(["inspect", "replica-sink"]) == 0
    assert "path              str       required" in capsys.readouterr().out
