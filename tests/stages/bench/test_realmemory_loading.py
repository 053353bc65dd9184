"""Loading page pairs from recorded traces: replay order, limits, and rejection of malformed files."""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stages.bench.realmemory import CORPUS_ENV, find_corpus, load_trace_pairs, read_trace
from pipeline.errors import CorruptData, TransportError

PAGE = 64


def _trace(tmp_path: Path, **overrides) -> Path:
    """A 4-page trace: epoch 0 rewrites pages 1 and 3, epoch 1 rewrites page 3 again."""
    arrays = {
        "base": np.arange(4 * PAGE, dtype=np.uint8).reshape(4, PAGE),
        "region_starts": np.array([0x1000, 0x9000], dtype=np.uint64),
        "region_npages": np.array([3, 1], dtype=np.uint64),
        "epoch000_pages": np.array([1, 3], dtype=np.uint64),
        "epoch000_data": np.full((2, PAGE), 7, dtype=np.uint8),
        "epoch001_pages": np.array([3], dtype=np.uint64),
        "epoch001_data": np.full((1, PAGE), 9, dtype=np.uint8),
    }
    arrays.update(overrides)
    path = tmp_path / "trace.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_pairs_are_previous_contents_and_new_contents_in_epoch_order(tmp_path):
    pairs = load_trace_pairs(_trace(tmp_path))
    base = np.arange(4 * PAGE, dtype=np.uint8).reshape(4, PAGE)
    assert pairs.name == "trace" and pairs.npages == 3 and pairs.page_size == PAGE
    np.testing.assert_array_equal(pairs.cached[0], base[1])
    np.testing.assert_array_equal(pairs.cached[1], base[3])
    np.testing.assert_array_equal(pairs.cached[2], np.full(PAGE, 7))  # epoch 1 starts from epoch 0's contents
    np.testing.assert_array_equal(pairs.current[2], np.full(PAGE, 9))
    assert pairs.nbytes == 3 * PAGE


def test_whole_trace_reads_layout_and_epochs_in_order(tmp_path):
    trace = read_trace(_trace(tmp_path))
    assert trace.base.shape == (4, PAGE) and trace.region_starts.tolist() == [0x1000, 0x9000]
    assert [pages.tolist() for pages, _ in trace.epochs] == [[1, 3], [3]]
    assert trace.epochs[1][1].shape == (1, PAGE)
    assert len(read_trace(_trace(tmp_path), max_epochs=1).epochs) == 1


def test_max_pages_stops_the_replay(tmp_path):
    pairs = load_trace_pairs(_trace(tmp_path), max_pages=1)
    assert pairs.npages == 1 and pairs.cached.shape == pairs.current.shape == (1, PAGE)


@pytest.mark.parametrize("overrides, complaint", [
    ({"base": None}, "missing array 'base'"),
    ({"base": np.zeros((4, PAGE), dtype=np.int16)}, "'base' is int16"),
    ({"region_npages": np.array([2, 1], dtype=np.uint64)}, "do not cover"),
    ({"epoch001_pages": np.array([4], dtype=np.uint64)}, "names page 4"),
    ({"epoch000_pages": np.array([1, 1], dtype=np.uint64)}, "lists a page twice"),
    ({"epoch001_data": np.zeros((2, PAGE), dtype=np.uint8)}, "'epoch001_data' has shape"),
    ({"epoch001_data": None}, "epoch 001 lacks its data"),
    ({"epoch003_pages": np.array([0], dtype=np.uint64), "epoch003_data": np.zeros((1, PAGE), np.uint8)},
     "not numbered"),
])
def test_malformed_trace_is_rejected_naming_the_array(tmp_path, overrides, complaint):
    with pytest.raises(CorruptData, match=complaint):
        load_trace_pairs(_trace(tmp_path, **overrides))
    with pytest.raises(CorruptData, match=complaint):
        read_trace(_trace(tmp_path, **overrides))


def test_file_that_is_not_an_archive_is_corrupt_data(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(CorruptData, match="junk.npz"):
        load_trace_pairs(path)


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_compressed_trace_is_corrupt_data(tmp_path, damage):
    path = tmp_path / "damaged.npz"
    np.savez_compressed(path, base=np.random.default_rng(0).integers(0, 9, (64, 4096), dtype=np.uint8),
                        region_starts=np.zeros(1, np.uint64), region_npages=np.array([64], np.uint64))
    raw = bytearray(path.read_bytes())
    if damage == "flipped":
        raw[2000:2100] = bytes(b ^ 0x55 for b in raw[2000:2100])
    else:
        del raw[len(raw) // 2:]
    path.write_bytes(raw)
    with pytest.raises(CorruptData, match="damaged.npz"):
        read_trace(path)


def test_array_claiming_more_than_memory_is_corrupt_data(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1 << 40, 4096)})
    small = io.BytesIO()
    np.save(small, np.zeros(1, np.uint64))
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("base.npy", header.getvalue() + b"x" * 100)
        archive.writestr("region_starts.npy", small.getvalue())
        archive.writestr("region_npages.npy", small.getvalue())
    with pytest.raises(CorruptData, match="more bytes than memory"):
        read_trace(tmp_path / "huge.npz")


def test_missing_file_is_a_transport_error(tmp_path):
    with pytest.raises(TransportError, match="cannot read"):
        load_trace_pairs(tmp_path / "absent.npz")


def test_corpus_location_follows_the_environment(tmp_path, monkeypatch):
    trace = _trace(tmp_path)
    monkeypatch.setenv(CORPUS_ENV, str(trace))
    assert find_corpus() == trace
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "elsewhere"))
    assert find_corpus() is None


def test_recorded_corpus_replays_into_changed_page_pairs():
    corpus = find_corpus()
    if corpus is None:
        pytest.skip("recorded corpus not present")
    pairs = load_trace_pairs(corpus, max_pages=300)
    assert pairs.current.shape == (300, 4096) and pairs.cached.dtype == np.uint8
    assert (pairs.cached != pairs.current).any(axis=1).all()  # a trace lists only pages that changed
