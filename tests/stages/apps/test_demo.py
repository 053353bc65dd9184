"""``pagepipe demo``: a live workload replicated through real processes over tcp loopback."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from rich.console import Console

from stages.apps.demo import DemoOptions, DemoResult, Progress, main, progress_table, run_demo
from stages.common.replica_store import read_manifest, verify_replica


def test_demo_replica_equals_source_and_every_epoch_is_acknowledged(tmp_path):
    replica = tmp_path / "replica"
    result = run_demo(DemoOptions(size=4 << 20, seconds=1.5, replica=str(replica)), show_progress=False)
    assert result.identical
    assert result.epochs >= 2
    assert read_manifest(replica)["epoch"] == result.epochs
    assert verify_replica(replica).ok
    assert len(result.ack_latencies_ms) == result.epochs - 1     # the timed run, after the initial copy
    assert all(latency > 0 for latency in result.ack_latencies_ms)
    assert result.dirty_bytes >= 4 << 20          # the first epoch carries every page
    assert 0 < result.wire_bytes
    assert result.statistics[("replica-sink0", 0)]["counters"]["epochs_committed"] == result.epochs


@pytest.mark.parametrize("workload, codec, workers", [("sim", "xbzrle", 2), ("log", "xen+lz4", 1)])
def test_demo_options_choose_workload_codec_and_workers(tmp_path, workload, codec, workers):
    result = run_demo(DemoOptions(workload=workload, codec=codec, workers=workers, size=2 << 20, seconds=1.0,
                                  rate=20, replica=str(tmp_path / "replica"), fsync=True), show_progress=False)
    assert result.identical, result.warnings


def test_demo_command_exits_zero_with_summary(capsys):
    assert main(["--seconds", "1", "--size", "2MiB", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "byte for byte: identical" in out
    assert "checkpoint -> ack median" in out


@pytest.mark.parametrize("argument, message", [(["--codec", "brotli"], "codec 'brotli'"),
                                                (["--workload", "chess"], "unknown workload 'chess'"),
                                                (["--size", "lots"], "not a size"),
                                                (["--max-unacked", "-1"], "max-unacked: -1 is below the minimum 0")])
def test_demo_command_refuses_bad_options(capsys, argument, message):
    assert main(["--seconds", "1", "--no-progress"] + argument) == 2
    assert message in capsys.readouterr().err


def test_demo_progress_table_shows_live_figures():
    result = DemoResult(True, epochs=12, seconds=1.0, dirty_bytes=8 << 20, wire_bytes=1 << 20,
                        pauses_ms=[0.5] * 12, ack_latencies_ms=[10.0] * 12)
    console = Console(width=120, record=True)
    console.print(progress_table(result, Progress(), elapsed=1.0, acked=11))
    text = console.export_text()
    for heading in ("epoch", "dirty MB/s", "wire MB/s", "ratio", "pause ms", "ack ms", "busy %"):
        assert heading in text
    assert "8.0" in text    # compression ratio 8 MiB / 1 MiB
    assert np.isclose(result.ratio, 8.0)


def test_demo_recovers_from_a_replica_damaged_while_it_runs(tmp_path):
    replica = tmp_path / "replica"
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(run_demo(
        DemoOptions(size=2 << 20, seconds=3.0, replica=str(replica), max_unacked=4), show_progress=False)))
    runner.start()
    try:
        while runner.is_alive() and not (replica / "manifest.json").exists():
            time.sleep(0.01)
        with open(replica / "pages.img", "r+b") as image:       # bit rot under the running receiver
            for page in range(512):
                image.seek(page * 4096 + 100)
                image.write(b"\xde\xad\xbe\xef")
    finally:
        runner.join(timeout=120)
    result = outcome[0]
    assert result.identical
    assert any("digest mismatch" in warning for warning in result.warnings)
    assert result.statistics[("replica-sink0", 0)]["counters"]["resyncs_requested"] >= 2   # on start, then for the damage
