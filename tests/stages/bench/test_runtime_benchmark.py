"""The runtime benchmark runs end to end on tiny settings and reports every figure (never judged on speed here)."""
import json

from stages.bench import runtime

FIGURES = ("pyzmq_gbps", "chain0_gbps", "chain3_gbps", "chain1_gbps", "chain3_of_pyzmq", "overhead_cpu_us",
           "overhead_wall_us", "zstd_w1_mbps", "zstd_w2_mbps", "scaling", "scaling_cpu_ratio", "pass_through_cpu_us")


def test_runtime_benchmark_reports_every_figure_and_target(tmp_path, capsys):
    out = tmp_path / "runtime.json"
    status = runtime.main(["--repeat", "1", "--megabytes", "8", "--batches", "50", "--epochs", "1", "--json", str(out)])
    assert status == 0  # missed targets are reported, not failures
    figures = json.loads(out.read_text())
    assert set(FIGURES) <= set(figures)
    assert all(figures[name] > 0 for name in FIGURES)
    printed = capsys.readouterr().out
    for _, label, *_ in runtime.TARGETS:
        assert label in printed
    assert figures["chain3_processes"] == 5 and figures["zstd_w2_processes"] == 4
    for key in ("hop_cpu_per_gb", "chain3_cpu_per_gb", "zstd_w1_cpu_per_gb", "zstd_w2_cpu_per_gb"):
        assert "supervisor" in figures[key] and all(value >= 0 for value in figures[key].values())
    assert set(figures["chain3_cpu_per_gb"]) == {"test-src0", "identity0", "identity1", "identity2", "rate-sink0",
                                                 "supervisor"}
