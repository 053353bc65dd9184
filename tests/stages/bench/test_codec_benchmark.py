"""The codec benchmark on tiny data: structure and correctness of its figures, never speed."""
import json
from dataclasses import dataclass

import numpy as np
import pytest

from stages.bench.codecs import (CAPTURES_ENV, SYNTHETIC_PATTERNS, CodecResult, DatasetResult, batch_slices, check_targets, main,
                               measure, resolve_data, select_codecs, synthetic_pairs)
from stages.bench.realmemory import CORPUS_ENV, find_corpus
from pipeline.errors import ConfigError
from stages.codecs import list_codecs


@dataclass
class WholePages:
    """Test stand-in for a codec: the payload is the current pages, verbatim."""

    payload: np.ndarray


class CopyCodec:
    """Test stand-in: 'encodes' by copying, and records the cache it was handed."""

    def __init__(self):
        self.caches_seen: list[np.ndarray] = []

    def encode(self, current, cached):
        self.caches_seen.append(cached.copy())
        cached[:] = current
        return WholePages(current.reshape(-1).copy())

    def decode(self, encoded, replica):
        replica[:] = encoded.payload.reshape(replica.shape)


class ForgetfulCodec(CopyCodec):
    """Test stand-in for a broken codec: decode writes nothing."""

    def decode(self, encoded, replica):
        pass


def test_every_pattern_makes_reproducible_pairs_that_differ():
    for pattern in SYNTHETIC_PATTERNS:
        first, again = synthetic_pairs(pattern, 8, seed=3), synthetic_pairs(pattern, 8, seed=3)
        assert first.current.shape == first.cached.shape == (8, 4096) and first.current.dtype == np.uint8
        np.testing.assert_array_equal(first.current, again.current)
        assert (first.cached != first.current).any(axis=1).all(), pattern


def test_batches_cover_every_page_once():
    slices = batch_slices(10, 4)
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 10)]


def test_measure_reports_ratio_and_speeds_against_memcpy():
    pairs = synthetic_pairs("sparse-writes", 16)
    result = measure(pairs, {"copy": CopyCodec()}, repeat=2, batch_pages=5, real=True)
    assert (result.name, result.real, result.npages, result.page_bytes) == ("synthetic:sparse-writes", True, 16, 16 * 4096)
    row = result.result("copy")
    assert row is not None and row.error == ""
    assert row.ratio == pytest.approx(1.0)  # whole pages in, whole pages out
    assert result.memcpy_gbps > 0 and row.encode_gbps > 0 and row.decode_gbps > 0
    assert row.encode_x_memcpy == pytest.approx(row.encode_gbps / result.memcpy_gbps)
    assert row.decode_x_memcpy == pytest.approx(row.decode_gbps / result.memcpy_gbps)


def test_every_repeat_encodes_from_the_old_cache():
    pairs = synthetic_pairs("counters", 6)
    codec = CopyCodec()
    measure(pairs, {"copy": codec}, repeat=3, batch_pages=6)
    assert len(codec.caches_seen) == 3
    for seen in codec.caches_seen:
        np.testing.assert_array_equal(seen, pairs.cached)


def test_codec_that_decodes_wrong_pages_is_reported_and_others_still_measured():
    pairs = synthetic_pairs("fresh-allocations", 4)
    result = measure(pairs, {"broken": ForgetfulCodec(), "copy": CopyCodec()}, repeat=2, batch_pages=4)
    broken = next(r for r in result.codecs if r.codec == "broken")
    assert "decode did not rebuild" in broken.error and result.result("broken") is None
    assert result.result("copy") is not None


def _dataset(real: bool, **rows: tuple[float, float, float]) -> DatasetResult:
    """rows: codec -> (ratio, encode x memcpy, decode x memcpy), with memcpy at 10 GB/s."""
    data = DatasetResult("d", real, 1, 4096, 10.0)
    for codec, (ratio, enc, dec) in rows.items():
        data.codecs.append(CodecResult(codec, ratio, enc * 10, dec * 10, enc, dec))
    return data


def test_targets_are_checked_on_real_memory_only():
    real = _dataset(True, native=(10.0, 0.6, 0.5), xbzrle=(8.0, 0.3, 0.8), **{"native+zstd": (10.4, 0.4, 0.4)})
    checks = {c.target: c for c in check_targets([real, _dataset(False, native=(1, 1, 1))])}
    assert len(checks) == 5 and all(c.dataset == "d" for c in checks.values())
    assert checks["native encode >= 0.55 x memcpy"].met is True
    assert checks["native encode >= 1.0 x xbzrle encode"].figure == pytest.approx(2.0)
    assert checks["native decode >= 0.7 x memcpy"].met is False
    assert checks["native ratio >= 1.0 x xbzrle ratio"].figure == pytest.approx(1.25)
    assert checks["native+zstd ratio >= 1.35 x xbzrle ratio"].met is False  # 1.3 x


def test_target_needing_an_unmeasured_codec_is_not_measured():
    checks = check_targets([_dataset(True, native=(10.0, 0.6, 0.9))])
    needs_xbzrle = [c for c in checks if "xbzrle" in c.target]
    assert needs_xbzrle and all(c.met is None and c.figure is None for c in needs_xbzrle)


def test_data_defaults_to_synthetic_without_a_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path))
    sources = resolve_data([], synthetic_pages=4)
    assert [s.name for s in sources] == [f"synthetic:{p}" for p in SYNTHETIC_PATTERNS]
    assert not any(s.real for s in sources)
    assert sources[0].load(None).npages == 4
    with pytest.raises(ConfigError, match="no corpus found"):
        resolve_data(["corpus"], synthetic_pages=4)
    with pytest.raises(ConfigError, match="no such file"):
        resolve_data([f"capture:{tmp_path / 'absent.npz'}"], synthetic_pages=4)
    with pytest.raises(ConfigError, match="expected synthetic"):
        resolve_data(["everything"], synthetic_pages=4)


def _write_capture(path, pairs):
    np.savez(path, base=pairs.cached, region_starts=np.array([0x1000], np.uint64),
             region_npages=np.array([pairs.npages], np.uint64), epoch000_pages=np.arange(pairs.npages, dtype=np.uint64),
             epoch000_data=pairs.current)


def test_capture_file_is_real_memory(tmp_path):
    pairs = synthetic_pairs("sparse-writes", 3)
    _write_capture(tmp_path / "mine.npz", pairs)
    (source,) = resolve_data([f"capture:{tmp_path / 'mine.npz'}"], synthetic_pages=4)
    loaded = source.load(2)
    assert source.real and source.name == "mine" and loaded.npages == 2
    np.testing.assert_array_equal(loaded.current, pairs.current[:2])


def test_all_adds_every_capture_in_the_captures_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "no-corpus"))
    monkeypatch.setenv(CAPTURES_ENV, str(tmp_path))
    for name in ("b-capture", "a-capture"):
        _write_capture(tmp_path / f"{name}.npz", synthetic_pairs("counters", 2))
    names = [s.name for s in resolve_data(["all"], synthetic_pages=2)]
    assert names == [f"synthetic:{p}" for p in SYNTHETIC_PATTERNS] + ["a-capture", "b-capture"]


def test_bad_arguments_exit_with_2(tmp_path):
    assert main(["--repeat", "0"]) == 2
    assert main(["--data", "nonsense"]) == 2
    assert main(["--codecs", "gzip"]) == 2
    assert main(["--no-such-option"]) == 2
    unwritable = tmp_path / "missing-folder" / "report.json"
    assert main(["--data", "synthetic", "--pages", "2", "--repeat", "1", "--codecs", "native",
                 "--json", str(unwritable)]) == 2


def test_empty_trace_is_skipped(tmp_path):
    empty = synthetic_pairs("counters", 1)
    np.savez(tmp_path / "empty.npz", base=empty.cached, region_starts=np.zeros(1, np.uint64),
             region_npages=np.ones(1, np.uint64))
    report = tmp_path / "report.json"
    assert main(["--data", f"capture:{tmp_path / 'empty.npz'}", "--codecs", "native", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["datasets"] == []


def test_every_registered_codec_round_trips_on_every_pattern(tmp_path, monkeypatch):
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path))  # synthetic only, whether or not the corpus is here
    expected = list(select_codecs([]))
    assert {"native", "xbzrle", "native+zstd"} <= set(expected) <= set(list_codecs())
    report = tmp_path / "report.json"
    assert main(["--pages", "24", "--repeat", "1", "--batch-pages", "10", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())
    assert [d["name"] for d in figures["datasets"]] == [f"synthetic:{p}" for p in SYNTHETIC_PATTERNS]
    for data in figures["datasets"]:
        assert [r["codec"] for r in data["codecs"]] == expected
        for row in data["codecs"]:
            assert row["error"] == "" and row["ratio"] > 0 and row["encode_gbps"] > 0 and row["decode_gbps"] > 0
    assert figures["targets"] == []


def test_corpus_run_reports_every_target(tmp_path):
    if find_corpus() is None:
        pytest.skip("recorded corpus not present")
    report = tmp_path / "report.json"
    assert main(["--data", "corpus", "--pages", "64", "--repeat", "1", "--json", str(report)]) == 0
    targets = json.loads(report.read_text())["targets"]
    assert len(targets) == 5 and all(t["dataset"] == "memcached-trace" for t in targets)
    assert all(t["met"] in (True, False) and t["figure"] > 0 for t in targets)
