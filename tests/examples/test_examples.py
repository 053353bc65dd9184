"""Each example in examples/ run as a user would: a real subprocess with small arguments, its result checked."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.batch import PageKind
from pipeline.testing import Harness, page_kinds, pages_batch
from stages.common.replica_store import load_replica, read_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def run_example(name: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``examples/<name>`` with the repository importable; its output captured.

    The environment carries ``PAGEPIPE_TEST_RUN=<cwd>`` so that processes the
    example starts can be told apart from those of other test runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONIOENCODING": "utf-8", "PAGEPIPE_TEST_RUN": str(cwd)}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def live_processes_started_by_run(cwd: Path) -> list[int]:
    """Pids of live processes started by the example run in ``cwd`` (see ``run_example``)."""
    marker = f"PAGEPIPE_TEST_RUN={cwd}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue   # the process ended while we looked
    return pids


@pytest.mark.parametrize("name", ["replicate_simulation.py", "compare_codecs_on_live_process.py"])
def test_example_help_describes_its_options(name, tmp_path):
    completed = run_example(name, "--help", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "--checkpoints" in completed.stdout


@pytest.mark.parametrize("name", ["replicate_simulation.py", "compare_codecs_on_live_process.py"])
def test_example_refuses_zero_checkpoints(name, tmp_path):
    completed = run_example(name, "--checkpoints", "0", cwd=tmp_path)
    assert completed.returncode == 2
    assert "--checkpoints" in completed.stderr


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_simulation_replica_equals_the_array(mode, tmp_path):
    replica = tmp_path / "replica"
    completed = run_example("replicate_simulation.py", "--size", "128", "--checkpoints", "8", "--rate", "50",
                            "--mode", mode, "--replica", str(replica), cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "replica equals the array: yes" in completed.stdout
    assert read_manifest(replica)["epoch"] == 8
    grid = load_replica(replica)["region0"][:128 * 128 * 4].view(np.float32)
    assert grid.max() > 0   # the heater's warmth reached the replica
    ratio = float(re.search(r"ratio ([\d.]+)", completed.stdout).group(1))
    assert ratio > 0


def test_codec_chains_compared_on_a_live_process_decode_to_the_same_memory(tmp_path):
    keep = tmp_path / "keep"
    completed = run_example("compare_codecs_on_live_process.py", "--checkpoints", "5", "--keep", str(keep),
                            "--chain", "rle format=xbzrle", "--chain", "rle format=native ! zstd", cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "replayed pages match the recording: yes" in completed.stdout
    assert not live_processes_started_by_run(tmp_path), "the example left its child process running"
    recorded = load_replica(keep / "replica-raw")
    assert recorded and read_manifest(keep / "replica-raw")["epoch"] == 5
    raw_bytes = (keep / "raw.trace").stat().st_size
    for index in (0, 1):
        assert 0 < (keep / f"chain{index}.trace").stat().st_size < raw_bytes   # both chains compress
        replayed = load_replica(keep / f"replica{index}")
        assert replayed.keys() == recorded.keys()
        for region in recorded:
            np.testing.assert_array_equal(replayed[region], recorded[region], err_msg=f"chain {index}, {region}")
    ratios = [float(value) for value in re.findall(r"│\s+[\d,]+\s+│\s+([\d.]+)\s+│", completed.stdout)]
    assert len(ratios) == 2 and all(ratio > 1 for ratio in ratios)


def test_simulation_with_an_unusable_replica_path_says_why(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    completed = run_example("replicate_simulation.py", "--checkpoints", "3", "--mode", "inline",
                            "--replica", str(blocker / "replica"), cwd=tmp_path)
    assert completed.returncode == 2
    assert "replica-sink0" in completed.stderr and str(blocker) in completed.stderr
    assert "Traceback" not in completed.stderr


def test_codec_comparison_refuses_a_bad_chain_before_starting_the_child(tmp_path):
    completed = run_example("compare_codecs_on_live_process.py", "--checkpoints", "2", "--chain", "rle format=bogus",
                            cwd=tmp_path)
    assert completed.returncode == 2
    assert "'bogus' is not one of" in completed.stderr and "Traceback" not in completed.stderr
    assert not live_processes_started_by_run(tmp_path)


@pytest.mark.parametrize("seed", [1, 2])
def test_failover_backup_resumes_the_killed_primary_and_matches_an_uninterrupted_run(seed, tmp_path):
    completed = run_example("failover.py", "--steps", "60", "--rate", "30", "--size", "96", "--seed", str(seed),
                            cwd=tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "every output the primary released is covered by the replica's checkpoint: yes" in output
    assert "outputs repeated by the resumed run: 0" in output
    assert "final output and grid equal an uninterrupted run: yes" in output
    assert re.search(r"failure detected [\d.]+ s after its last heartbeat", output)
    assert re.search(r"resumed from the replica in [\d.]+ ms", output)
    assert not live_processes_started_by_run(tmp_path), "the example left a process running"


def load_example(name: str):
    """An example script imported as a module (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_stage_sends_pages_written_in_most_epochs_raw():
    """The example's stage under the harness: after the warm-up, a page written every epoch goes RAW."""
    stage_class = load_example("custom_stage.py").HotPagesRaw
    with Harness(stage_class(share=0.75, warmup=2)) as harness:
        for epoch in (1, 2):
            harness.push(pages_batch([1, 2] if epoch == 1 else [1, 3], epoch=epoch))
            harness.end_epoch()
        kinds = page_kinds(harness.push_one(pages_batch([1, 2, 3, 4], zero=[4], epoch=3)))
    assert kinds == {1: PageKind.RAW, 2: PageKind.NORMAL, 3: PageKind.NORMAL, 4: PageKind.ZERO}
    assert harness.stage.counters == {"zero": 1, "raw": 1, "normal": 6, "hot": 1}


@pytest.mark.parametrize("mode", ["inline", "process"])
def test_custom_stage_experiment_runs_beside_the_built_in_and_replicates_the_same_memory(mode, tmp_path):
    completed = run_example("custom_stage.py", "--source", "workload", "--seconds", "0.3", "--size", "4MiB",
                            "--repeats", "1", "--mode", mode, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "replicas identical" in completed.stdout
    built_in, experiment = [line for line in completed.stdout.splitlines()
                            if "│ built-in" in line or "│ hot-raw" in line]
    assert "trace-src0+classify0+xor-delta0+rle0" in built_in      # the built-ins fuse ...
    assert experiment.rstrip(" │").endswith("-")                   # ... the experiment's stage is never swallowed
    assert int(experiment.split("│")[5].replace(",", "")) > 0     # it sent some pages RAW
