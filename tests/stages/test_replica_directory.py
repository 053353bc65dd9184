"""What marks a replica directory (its manifest and lock file); replica-sink refuses someone else's
directory unless told, and two sinks never write one replica."""
from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, ReplicaError
from pipeline.stage import StageContext
from stages.common.replica_store import LOCK, verify_replica
from stages.replica import ReplicaSink


def _started(path, **properties) -> ReplicaSink:
    sink = ReplicaSink(path=str(path), fsync=False, **properties)
    sink.start(StageContext("replica-sink0"))
    return sink


def test_a_directory_of_other_files_is_refused_unless_forced(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="holds 1 other file.*thesis.tex.*force=true"):
        _started(tmp_path)
    assert not (tmp_path / LOCK).exists()
    sink = _started(tmp_path, force=True)
    sink.stop()
    assert (tmp_path / LOCK).exists() and (tmp_path / "thesis.tex").read_text() == "years of work"
    _started(tmp_path).stop()     # now marked as a replica: accepted without force


def test_new_and_empty_directories_are_claimed(tmp_path):
    _started(tmp_path / "new" / "replica").stop()
    assert (tmp_path / "new" / "replica" / LOCK).exists()
    (tmp_path / "empty").mkdir()
    _started(tmp_path / "empty").stop()


def test_two_sinks_never_write_one_replica(tmp_path):
    first = _started(tmp_path)
    try:
        with pytest.raises(ReplicaError, match="another receiver is writing it"):
            _started(tmp_path)
    finally:
        first.stop()
    _started(tmp_path).stop()     # released with the first


def test_verify_names_a_missing_directory_a_file_and_a_stranger(tmp_path):
    assert "no such directory" in verify_replica(tmp_path / "missing").problems[0]
    (tmp_path / "file").write_text("x")
    assert "a file, not a replica directory" in verify_replica(tmp_path / "file").problems[0]
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes").write_text("x")
    assert "not a replica" in verify_replica(tmp_path / "stranger").problems[0]
    _started(tmp_path / "claimed").stop()
    assert "nothing committed yet" in verify_replica(tmp_path / "claimed").problems[0]
