"""The sender benchmark on a tiny trace: structure and consistency of its figures, never speed."""
import json
from pathlib import Path

import numpy as np

from stages.bench.sender import CONFIGS, SENDER_CHAIN, main

PAGE = 4096
BASE_PAGES, EPOCHS, CHANGED = 40, 3, 6


def write_trace(path: Path) -> Path:
    """A recorded trace in the corpus layout: a mostly-zero base, then a few pages rewritten sparsely per epoch."""
    rng = np.random.default_rng(5)
    base = np.zeros((BASE_PAGES, PAGE), dtype=np.uint8)
    base[:30] = rng.integers(0, 4, (30, PAGE), dtype=np.uint8)
    arrays = {"base": base, "region_starts": np.array([0x10000], np.uint64),
              "region_npages": np.array([BASE_PAGES], np.uint64)}
    for epoch in range(EPOCHS):
        pages = np.sort(rng.choice(30, CHANGED, replace=False)).astype(np.uint64)
        data = base[pages.astype(np.intp)].copy()
        data[:, rng.integers(0, PAGE, 16)] ^= 0x5A
        arrays[f"epoch{epoch:03d}_pages"], arrays[f"epoch{epoch:03d}_data"] = pages, data
    np.savez(path, **arrays)
    return path


def run(tmp_path: Path, *arguments: str) -> tuple[int, dict]:
    trace = write_trace(tmp_path / "trace.npz")
    out = tmp_path / "figures.json"
    code = main(["--trace", str(trace), "--repeats", "1", "--chains", "native+zstd,xbzrle",
                 "--json", str(out), *arguments])
    return code, json.loads(out.read_text())


def test_sender_benchmark_reports_both_modes_and_the_targets_for_the_default_configuration(tmp_path):
    code, figures = run(tmp_path, "--rounds", "2", "--configs", "default")
    assert code in (0, 1)                                          # 1 = a speed target missed: not judged here
    expected_bytes = (BASE_PAGES + 2 * EPOCHS * CHANGED) * PAGE    # the whole memory, then the epochs twice
    runtime = {(r["chain"], r["config"], r["mode"]): r for r in figures["runtime"]}
    assert set(runtime) == {(chain, "default", mode) for chain in (SENDER_CHAIN, "baseline: two hops", "baseline: one hop")
                            for mode in ("inline", "process")}
    for result in runtime.values():
        assert result["dirty_bytes"] == expected_bytes
        assert result["window_seconds"] > 0 and result["wall_seconds"] >= result["window_seconds"]
        assert result["gbps"] == expected_bytes / result["window_seconds"] / 1e9
        if result["mode"] == "process":
            assert result["cpu_per_gb"] and all(value >= 0 for value in result["cpu_per_gb"].values())
    assert figures["one_hop"]["met"] == (runtime[("baseline: one hop", "default", "process")]["gbps"] >= 6.0)
    assert figures["best_config"] == "default" and set(figures["targets"]) == {"default"}
    targets = figures["targets"]["default"]
    assert set(targets) == {"config", "throughput", "process_share_of_inline"}
    assert targets["throughput"]["met"] == (runtime[(SENDER_CHAIN, "default", "process")]["gbps"] >= 1.0)
    assert code == (0 if all(targets[key]["met"] for key in ("throughput", "process_share_of_inline")) else 1)


def test_sender_benchmark_measures_each_codec_chain_over_every_dirty_page(tmp_path):
    code, figures = run(tmp_path, "--modes", "")
    assert code == 0 and "runtime" not in figures
    direct = figures["direct"]
    assert set(direct) == {"native+zstd", "xbzrle"}
    for result in direct.values():
        assert result["bytes_in"] == (BASE_PAGES + EPOCHS * CHANGED) * PAGE
        assert result["ratio"] == result["bytes_in"] / result["bytes_out"] > 1
    assert figures["ratio_gain"]["whole_trace"] == direct["native+zstd"]["ratio"] / direct["xbzrle"]["ratio"]


def test_sender_benchmark_labels_the_default_and_the_best_configuration_it_tried(tmp_path):
    code, figures = run(tmp_path, "--modes", "inline", "--rounds", "1",
                        "--configs", "default,batch-pages=1024,zstd-workers=2")
    speeds = {r["config"]: r["gbps"] for r in figures["runtime"] if r["chain"] == SENDER_CHAIN}
    assert set(speeds) == {"default", "batch-pages=1024", "zstd-workers=2"}
    assert figures["best_config"] == max(speeds, key=speeds.get)
    assert figures["targets"]["default"]["config"] == "default"
    if figures["best_config"] != "default":
        assert figures["targets"]["best"]["config"] == figures["best_config"]
    assert code == 0        # inline alone: no process-mode target to miss


def test_sender_benchmark_refuses_a_malformed_trace_and_unknown_configurations(tmp_path, capsys):
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    assert main(["--trace", str(tmp_path / "bad.npz")]) == 2
    assert "not an .npz archive" in capsys.readouterr().err
    assert main(["--trace", str(write_trace(tmp_path / "trace.npz")), "--configs", "fastest"]) == 2
    assert "unknown configuration(s) fastest" in capsys.readouterr().err
    assert "default" in CONFIGS
