"""Co-location (pipeline.colocation): neighbouring stages sharing one worker process never change results.

Real runs in process mode, with and without co-location: the same bytes out, the same per-element totals
and per-epoch records; a failure names the member; every process stops, even when the supervisor is killed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages_for_tests import CallerSource, read_record
from tests_pipeline_support import descendants, wait_until_gone
from pipeline.colocation import colocate
from pipeline.epoch_stats import RUNTIME_KEYS
from pipeline.errors import ConfigError, StageFailed
from pipeline.pipeline import Pipeline
from stages.basic import Identity, NullSink
from stages.transport import write_trace_from_npz

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("workers", "batches_in", "pages_in", "bytes_in", "batches_out", "pages_out", "bytes_out", "counters")
FRAME = "heartbeat=0 stream-id=00112233445566778899aabbccddeeff"
"""A framed stream that does not depend on when it is written (no heartbeats, a fixed identity)."""
SOURCE = "test-src epochs=4 pages=256 batch-pages=16 page-size=256"


def nodes(text: str, policy: str, cpus: int | None = None) -> list[str]:
    return [node.name for node in colocate(Pipeline.parse(text).plan(), policy, cpus).nodes]


# ---- which neighbours join -------------------------------------------------------------------------------------

def test_chains_join_every_run_of_single_worker_neighbours_and_nothing_else():
    text = f"{SOURCE} ! identity ! identity workers=2 ! identity ! tee name=t ! identity ! null-sink  t. ! null-sink"
    assert nodes(text, "none") == Pipeline.parse(text).plan().names()
    assert nodes(text, "chains") == ["test-src0,identity0", "identity1", "identity2,t", "identity3,null-sink0",
                                     "null-sink1"]
    assert colocate(Pipeline.parse(text).plan(), "chains").worker_processes() == 6


def test_a_caller_side_stage_keeps_its_own_thread():
    plan = colocate(Pipeline.chain(CallerSource(), Identity(), NullSink()).plan(), "chains")
    assert plan.names() == ["caller-src0", "identity0,null-sink0"] and plan.worker_processes() == 1


def test_auto_joins_the_lightest_neighbours_first_and_only_until_the_processes_fit_the_cpus():
    text = "test-src ! classify ! xor-delta ! rle ! zstd ! frame ! null-sink"   # classify+xor-delta+rle fuse
    assert nodes(text, "auto", cpus=5) == nodes(text, "none")
    assert nodes(text, "auto", cpus=4) == ["test-src0", "classify0+xor-delta0+rle0", "zstd0", "frame0,null-sink0"]
    assert nodes(text, "auto", cpus=2) == ["test-src0,classify0+xor-delta0+rle0", "zstd0,frame0,null-sink0"]
    assert nodes(text, "auto", cpus=1) == nodes(text, "chains")
    plan = Pipeline.parse(text).plan()
    for cpus in range(1, 6):
        assert colocate(plan, "auto", cpus).worker_processes() == max(cpus, 1)


def test_a_policy_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match="colocate='some': use one of none, chains, auto"):
        Pipeline.parse(f"{SOURCE} ! null-sink").run(mode="process", colocate="some")


# ---- merging never changes results -----------------------------------------------------------------------------

def run_both(make, **run) -> tuple[dict, dict, list[str]]:
    """Run the pipeline ``make(tag)`` builds apart and chains-co-located; both results and the element names."""
    results = {}
    for tag, policy in (("apart", "none"), ("together", "chains")):
        pipeline = make(tag)
        with pipeline.start(mode="process", colocate=policy, **run) as handle:
            expected = pipeline.plan(colocate=policy).worker_processes()
            assert handle.worker_processes == expected
            results[tag] = handle.wait(timeout=120)
        names = [stage.name for stage in pipeline.elements]
    return results["apart"], results["together"], names


def assert_same_accounts(apart, together, names: list[str], skip_counters: tuple[str, ...] = ()) -> None:
    """Every element's totals and counters (timings aside) and per-epoch runtime records agree."""
    def results(counters: dict) -> dict:
        return {k: v for k, v in counters.items() if k not in skip_counters and not k.endswith("_seconds")}

    for name in names:
        one, other = apart.totals(name), together.totals(name)
        for key in COMPARED:
            if key == "counters":
                assert results(one[key]) == results(other[key]), name
            else:
                assert one[key] == other[key], (name, key)
    assert list(apart.epochs.stages) == list(together.epochs.stages)
    for name, epochs in apart.epochs.stages.items():
        for epoch, values in epochs.items():
            assert {k: values[k] for k in RUNTIME_KEYS} == \
                   {k: together.epochs.stages[name][epoch][k] for k in RUNTIME_KEYS}, (name, epoch)


def test_the_sender_chain_writes_the_same_bytes_and_accounts_in_one_process(tmp_path):
    def make(tag: str) -> Pipeline:
        return Pipeline.parse(f"test-src epochs=5 pages=300 batch-pages=64 pattern=random ! classify ! xor-delta ! "
                              f"rle ! zstd ! frame {FRAME} ! file-sink path={tmp_path / tag}")

    apart, together, names = run_both(make)
    assert (tmp_path / "apart").read_bytes() == (tmp_path / "together").read_bytes()
    assert {together.totals(name)["fused_as"] for name in names} == \
           {"test-src0,classify0+xor-delta0+rle0,zstd0,frame0,file-sink0"}
    assert_same_accounts(apart, together, names)


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """A recorded trace whose epochs rewrite a few bytes of some pages and zero one."""
    directory = tmp_path_factory.mktemp("colocation")
    rng = np.random.default_rng(3)
    memory = rng.integers(0, 256, (48, 4096), dtype=np.uint8)
    arrays = {"base": memory.copy(), "region_starts": np.array([0x1000000], np.uint64),
              "region_npages": np.array([48], np.uint64)}
    for epoch in range(4):
        pages = np.sort(rng.choice(48, 10, replace=False))
        for page in pages:
            memory[page, rng.integers(0, 4096, 8)] = rng.integers(0, 256, 8, dtype=np.uint8)
        memory[pages[0]] = 0
        arrays[f"epoch{epoch:03d}_pages"], arrays[f"epoch{epoch:03d}_data"] = pages, memory[pages]
    np.savez(directory / "memory.npz", **arrays)
    write_trace_from_npz(directory / "memory.npz", directory / "memory.trace", batch_pages=6)
    return directory / "memory.trace"


def test_trace_src_into_a_replica_gives_the_same_replica_and_accounts_in_one_process(trace, tmp_path):
    def make(tag: str) -> Pipeline:
        return Pipeline.parse(f"trace-src path={trace} ! classify ! xor-delta ! rle ! zstd ! frame {FRAME} ! "
                              f"deframe ! decode ! replica-sink path={tmp_path / tag} fsync=false")

    apart, together, names = run_both(make)
    files = sorted(path.relative_to(tmp_path / "apart") for path in (tmp_path / "apart").rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(tmp_path / "together")
                           for path in (tmp_path / "together").rglob("*") if path.is_file())
    for name in ("pages.img", "digests.u64"):   # the replica's pages and their digests
        assert (tmp_path / "apart" / name).read_bytes() == (tmp_path / "together" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / tag / "manifest.json").read_text()) for tag in ("apart", "together")]
    assert manifests[0]["epoch"] == manifests[1]["epoch"] == 5
    assert_same_accounts(apart, together, names)


def test_a_user_stage_a_fused_user_pair_and_a_timer_keep_their_results_in_one_process(tmp_path):
    def make(tag: str) -> Pipeline:
        return Pipeline.parse(f"gappy-src epochs=2 gap=300ms ! holder ! doubler ! identity ! epoch-noter ! "
                              f"recorder path={tmp_path / tag}")

    apart, together, names = run_both(make)
    assert read_record(tmp_path / "apart") == read_record(tmp_path / "together")
    assert together.totals("doubler0")["fused_as"] == together.totals("holder0")["fused_as"]  # one process
    assert_same_accounts(apart, together, names, skip_counters=("by_timer",))
    for result in (apart, together):     # the timer let go of each epoch's batch while the source waited
        assert result.totals("holder0")["counters"]["by_timer"] >= 1
        assert [values["noted"] for values in result.epochs.stages["epoch-noter0"].values()] == [1, 1]


def test_auto_starts_no_more_processes_than_cpus_and_keeps_results(tmp_path):
    text = f"{SOURCE} pattern=random ! identity ! doubler ! identity ! epoch-noter ! recorder path={tmp_path}/"
    apart = Pipeline.parse(text + "apart").run(mode="process", timeout=60)
    pipeline = Pipeline.parse(text + "auto")
    with pipeline.start(mode="process", colocate="auto") as handle:
        together = handle.wait(timeout=60)
    assert handle.worker_processes == min(5, len(os.sched_getaffinity(0)))   # doubler ! identity fuse: 5 nodes
    assert read_record(tmp_path / "apart") == read_record(tmp_path / "auto")
    assert_same_accounts(apart, together, [stage.name for stage in pipeline.elements])


def test_a_member_posts_warnings_under_its_own_name(tmp_path):
    result = Pipeline.parse(f"{SOURCE} ! warner ! null-sink").run(mode="process", colocate="chains", timeout=60)
    assert [message.stage for message in result.warnings] == ["warner0"]


# ---- failures --------------------------------------------------------------------------------------------------

def test_a_failing_member_is_named_and_every_member_and_process_stops(tmp_path):
    p = Pipeline.parse(f"{SOURCE} ! stop-marker path={tmp_path / 'a'} ! fail-at at=3 ! "
                       f"stop-marker path={tmp_path / 'b'} ! null-sink")
    with pytest.raises(StageFailed) as caught:
        p.run(mode="process", colocate="chains", timeout=60)
    assert (caught.value.stage, caught.value.worker, caught.value.category) == ("fail-at0", 0, "bug")
    assert "RuntimeError: planned failure at batch 3" in caught.value.reason
    assert "planned failure" in caught.value.traceback
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "stopped"


def test_a_member_failing_to_start_is_named_and_the_members_before_it_stop(tmp_path):
    p = Pipeline.parse(f"{SOURCE} ! stop-marker path={tmp_path / 'a'} ! frame ! "
                       f"file-sink path={tmp_path / 'missing' / 'x'}")
    with pytest.raises(StageFailed) as caught:
        p.run(mode="process", colocate="chains", timeout=60)
    assert (caught.value.stage, caught.value.category) == ("file-sink0", "error")
    assert "TransportError: file-sink: cannot create" in caught.value.reason
    assert (tmp_path / "a").read_text() == "stopped"


def test_a_member_failing_in_stop_is_named_and_the_other_members_still_stop(tmp_path):
    p = Pipeline.parse(f"{SOURCE} ! stop-marker path={tmp_path / 'a'} fail=true ! "
                       f"stop-marker path={tmp_path / 'b'} ! null-sink")
    with pytest.raises(StageFailed) as caught:
        p.run(mode="process", colocate="chains", timeout=60)
    assert caught.value.stage == "stop-marker0"
    assert "RuntimeError in stop(): planned failure in stop of stop-marker0" in caught.value.reason
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "stopped"


def test_a_sigkilled_supervisor_leaves_no_process_behind():
    supervisor = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "launch", "--colocate", "chains",
                                   "test-src epochs=100000000 pages=64 pattern=zeros ! identity ! identity ! "
                                   "null-sink"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while len(descendants(supervisor.pid)) < 2 and time.monotonic() < deadline:   # fork server + 1 worker
        time.sleep(0.05)
    time.sleep(0.5)
    everything = descendants(supervisor.pid)
    assert everything
    supervisor.kill()
    supervisor.wait(timeout=10)
    assert not wait_until_gone(everything)


def test_launch_says_how_many_worker_processes_it_starts():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "launch", "--colocate", "chains",
                           f"{SOURCE} ! identity ! identity ! null-sink"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 worker process for 4 elements (colocate=chains)" in done.stdout
