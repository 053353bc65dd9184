"""Arrays end to end and resume: region-src's arrays come back from the replica with their names, dtypes and
shapes, verified, as tracked arrays a new region-src replicates again."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ReplicaError
from pipeline.pipeline import Pipeline
from stages.classify import Classify
from stages.common.replica_store import DIGESTS, IMAGE, MANIFEST, region_keys
from stages.entropy import Decode, Zstd
from stages.framer import Deframe, Frame
from stages.replica import ReplicaSink
from stages.replica_store import load_arrays, load_replica, read_manifest, resume_from_replica
from stages.rle import RunLengthEncode
from stages.trackers.region import PAGE_SIZE, RegionSource, tracked_array
from stages.xor_delta import XorDelta


def program_state() -> dict[str, np.ndarray]:
    state = {"grid": tracked_array((64, 128), np.float64), "counts": tracked_array(4096, np.int32),
             "flags": tracked_array((2, 3, PAGE_SIZE), np.uint8)}
    state["grid"][:] = np.arange(64 * 128).reshape(64, 128) / 7
    state["counts"][:] = np.arange(4096) * -3
    state["flags"][1, 2, :10] = 1
    return state


def replicate(state: dict[str, np.ndarray], replica, checkpoints: int = 3) -> None:
    """Checkpoints of ``state`` through the whole sender and receiver chain (inline) into ``replica``."""
    source = RegionSource(regions=state)
    pipeline = Pipeline.chain(source, Classify(), XorDelta(), RunLengthEncode(), Zstd(), Frame(), Deframe(),
                              Decode(), ReplicaSink(path=str(replica), fsync=False))
    with pipeline.start(mode="inline") as running:
        for index in range(checkpoints):
            state["grid"][index] += 1.5
            state["counts"][index * 1000] = index
            source.checkpoint()
        source.close()
        running.wait(timeout=60)


def test_dtype_and_shape_travel_into_the_manifest_and_come_back(tmp_path):
    state = program_state()
    replicate(state, tmp_path)
    regions = {r["name"]: r for r in read_manifest(tmp_path)["regions"]}
    assert (regions["grid"]["dtype"], regions["grid"]["shape"]) == ("<f8", [64, 128])
    assert (regions["counts"]["dtype"], regions["counts"]["shape"]) == ("<i4", [4096])
    loaded = load_arrays(tmp_path)
    for name, array in state.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_resume_gives_tracked_arrays_that_replicate_again_with_every_page_first(tmp_path):
    state = program_state()
    replicate(state, tmp_path / "first")
    resumed = resume_from_replica(tmp_path / "first")
    assert list(resumed) == ["grid", "counts", "flags"]
    for name, array in state.items():
        np.testing.assert_array_equal(resumed[name], array)
        assert resumed[name].dtype == array.dtype and resumed[name].flags.writeable
        assert resumed[name].ctypes.data % PAGE_SIZE == 0

    source = RegionSource(regions=resumed)
    pipeline = Pipeline.chain(source, Frame(), Deframe(), ReplicaSink(path=str(tmp_path / "second"), fsync=False))
    with pipeline.start(mode="inline") as running:
        first = source.checkpoint()
        resumed["grid"][5, 5] = -1.0
        second = source.checkpoint()
        source.close()
        running.wait(timeout=60)
    total_pages = sum(-(-a.nbytes // PAGE_SIZE) for a in resumed.values())
    assert first.pages == total_pages
    assert source.tracking_mode == "uffd" and second.pages == 1
    np.testing.assert_array_equal(load_arrays(tmp_path / "second")["grid"], resumed["grid"])


def test_resume_refuses_a_damaged_page_and_returns_nothing(tmp_path):
    replicate(program_state(), tmp_path)
    with open(tmp_path / IMAGE, "r+b") as image:
        image.seek(3 * PAGE_SIZE + 17)
        byte = image.read(1)
        image.seek(3 * PAGE_SIZE + 17)
        image.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ReplicaError, match=r"region 'grid': page 3 differs from its digest"):
        resume_from_replica(tmp_path)


def test_resume_refuses_digests_that_do_not_add_up_to_the_manifest(tmp_path):
    replicate(program_state(), tmp_path)
    digests = np.fromfile(tmp_path / DIGESTS, dtype="<u8")
    digests[0] ^= 1
    digests.tofile(tmp_path / DIGESTS)
    with pytest.raises(ReplicaError, match="image digest"):
        resume_from_replica(tmp_path)


@pytest.mark.parametrize("version", [0, 2])
def test_resume_refuses_another_format_version_clearly(tmp_path, version):
    replicate(program_state(), tmp_path, checkpoints=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["version"] = version
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ReplicaError, match=f"manifest version {version} unsupported"):
        resume_from_replica(tmp_path)


def test_a_replica_written_without_dtypes_resumes_as_bytes(tmp_path):
    state = program_state()
    replicate(state, tmp_path, checkpoints=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for region in manifest["regions"]:      # as replicas were written before dtype and shape travelled
        del region["dtype"], region["shape"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    resumed = resume_from_replica(tmp_path)
    grid = resumed["grid"]
    assert grid.dtype == np.uint8 and grid.ndim == 1 and grid.size % PAGE_SIZE == 0
    np.testing.assert_array_equal(grid[:state["grid"].nbytes].view(np.float64).reshape(64, 128), state["grid"])
    assert load_arrays(tmp_path)["counts"].dtype == np.uint8


def test_a_manifest_whose_array_does_not_fit_its_pages_is_refused(tmp_path):
    replicate(program_state(), tmp_path, checkpoints=1)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["regions"][1]["shape"] = [10 ** 9]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ReplicaError, match="does not fit"):
        resume_from_replica(tmp_path)
    with pytest.raises(ReplicaError, match="does not fit"):
        load_replica(tmp_path)


def test_an_empty_directory_has_nothing_to_resume(tmp_path):
    with pytest.raises(ReplicaError, match="nothing committed"):
        resume_from_replica(tmp_path)


def test_repeated_region_names_get_distinct_keys(tmp_path):
    assert region_keys(({"name": "a", "start": 16}, {"name": "a", "start": 32}, {"name": "b", "start": 0})) == \
        ["a@0x10", "a@0x20", "b"]
