"""The runtime benchmark runs end to end on tiny settings and reports every figure (never judged on speed here)."""
import json

from stages.bench import runtime

FIGURES = ("pyzmq_gbps", "chain3_gbps", "chain1_gbps", "chain3_of_pyzmq", "overhead_cpu_us",
           "overhead_wall_us", "zstd_w1_mbps", "zstd_w2_mbps", "scaling")


def test_runtime_benchmark_reports_every_figure_and_target(tmp_path, capsys):
    out = tmp_path / "runtime.json"
    status = runtime.main(["--repeat", "1", "--megabytes", "8", "--batches", "50", "--epochs", "1", "--json", str(out)])
    assert status == 0  # missed targets are reported, not failures
    figures = json.loads(out.read_text())
    assert set(FIGURES) <= set(figures)
    assert all(figures[name] > 0 for name in FIGURES)
    printed = capsys.readouterr().out
    for target in ("identity x3 chain", "runtime CPU per batch per stage", "zstd-3 workers=2 vs 1"):
        assert target in printed
