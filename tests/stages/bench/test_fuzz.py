"""The fuzzing and fault suite (issue 10), short: the same fuzzers and attack cases as
``pagepipe bench fuzz``, on counts a test run affords, and proof that they can find what they look for."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import CorruptData
from stages.bench import fuzz_codecs, fuzz_wire
from stages.bench.fuzz import main
from stages.bench.fuzz_attacks import CASES, run_case
from stages.bench.fuzz_codecs import GuardedRows, fuzz_codecs as run_codec_fuzzer
from stages.bench.fuzz_lock import lock_trials
from stages.bench.fuzz_reference import reference_decode
from stages.bench.fuzz_wire import SEED_CHAINS, check_replica, make_seed_stream, receive
from stages.codecs import get_codec


@lru_cache(maxsize=None)
def seed_stream(chain: str) -> fuzz_wire.SeedStream:
    return make_seed_stream(chain, 7)


@pytest.mark.parametrize("chain", SEED_CHAINS)
def test_every_intact_seed_stream_commits_every_checkpoint(tmp_path, chain):
    stream = seed_stream(chain)
    committed, error = receive(stream.data, tmp_path / "replica", np.random.default_rng(0))
    assert error is None and committed == len(stream.snapshots) == 6
    assert check_replica(tmp_path / "replica", stream) is None


@settings(max_examples=60, deadline=None)
@given(chain=st.sampled_from(SEED_CHAINS), seed=st.integers(0, 2**32 - 1), forged=st.booleans())
def test_mutated_streams_raise_only_corrupt_data_and_leave_one_checkpoint(tmp_path_factory, chain, seed, forged):
    stream = seed_stream(chain)
    rng = np.random.default_rng(seed)
    data = fuzz_wire.forged_mutation(rng, stream.data) if forged else fuzz_wire.natural_mutation(rng, stream.data)
    replica = tmp_path_factory.mktemp("replica")
    _, error = receive(data, replica, rng)
    assert error is None or isinstance(error, CorruptData), repr(error)
    assert check_replica(replica, stream) is None


def test_the_wire_fuzzer_runs_clean(tmp_path):
    tally = fuzz_wire.fuzz_wire(120, 5, tmp_path)
    assert tally.streams == 120 and tally.natural and tally.forged and tally.refused
    assert tally.violations == []


def test_the_replica_check_sees_a_wrong_checkpoint(tmp_path):
    """The fuzzer's oracle can fail: a replica of another stream's memory is reported."""
    ours, other = seed_stream("native"), make_seed_stream("native", 99)
    receive(other.data, tmp_path / "replica", np.random.default_rng(0))
    assert "none of the stream's checkpoints" in check_replica(tmp_path / "replica", ours)
    (tmp_path / "replica" / "stray").write_bytes(b"x")
    assert "stray files" in check_replica(tmp_path / "replica", ours)


def test_the_codec_fuzzer_runs_clean():
    tally = run_codec_fuzzer(2000, 3)
    assert tally.cases == 2000 and tally.accepted and tally.rejected
    assert tally.violations == []


def test_the_codec_fuzzer_catches_a_decoder_that_disagrees(monkeypatch):
    """A reference that rejects everything makes every accepted payload a violation."""
    monkeypatch.setattr(fuzz_codecs, "reference_decode", lambda *args: None)
    tally = run_codec_fuzzer(200, 3)
    assert tally.violations and all("reference rejected" in v for v in tally.violations)


@pytest.mark.parametrize("chain", ["native", "xbzrle", "xen", "native+zstd", "xen+lz4"])
def test_the_reference_decoders_agree_with_the_codecs_on_valid_batches(chain):
    rng = np.random.default_rng(11)
    previous, current = fuzz_codecs._random_batch(rng, 4096)
    encoded = get_codec(chain).encode(current, previous.copy())
    pages = reference_decode(chain, encoded.payload.tobytes(), [int(o) for o in encoded.offsets],
                             [int(k) for k in encoded.kinds], int(encoded.raw_size), previous)
    np.testing.assert_array_equal(pages, current)


def test_guard_pages_sit_right_after_the_rows():
    guarded = GuardedRows(3, 1024)
    guarded.array[:] = 7                       # the rows are writable...
    assert guarded.array.shape == (3, 1024) and (guarded.array == 7).all()
    code = ("import ctypes\nfrom stages.bench.fuzz_codecs import GuardedRows\n"
            "rows = GuardedRows(3, 1024)\nctypes.memset(rows.array.ctypes.data + 3 * 1024, 1, 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGSEGV    # ...the byte after is not


@pytest.mark.parametrize("case", sorted(CASES))
def test_peer_attack_cases_commit_nothing_and_stay_small(case):
    if case == "zero-flood":
        pytest.skip("192 MiB of attack traffic: run by `pagepipe bench fuzz`")
    result = run_case(case)
    assert result["error_ok"], result
    assert result["attacker_epochs_committed"] == 0 and not result["image_grew"]
    assert result["rss_above_idle_mib"] < 64
    if case == "injection":
        assert result["epochs_refused"] == 1


def test_a_second_receiver_on_a_replica_is_refused():
    tally = lock_trials(1)
    assert (tally.trials, tally.refused) == (1, 1), tally.failures


def test_the_fuzz_command_reports_each_part(tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    assert main(["--runs", "20", "--codec-runs", "200", "--jobs", "1", "--skip", "attacks", "lock",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["wire"]["streams"] == 20 and report["codecs"]["payloads"] == 200
    text = capsys.readouterr().out
    assert "of the 100,000 the target asks" in text and "of the 1,000,000 the target asks" in text
