"""pagepipe report: pictures made from real runs (launch --stats-json) and benchmark files, side by side."""
from __future__ import annotations

import json

import pytest

from pipeline.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Statistics of two real runs, codec native+zstd against xbzrle, on the same workload."""
    folder = tmp_path_factory.mktemp("runs")
    files = []
    for name, chain in (("native-zstd", "rle ! zstd"), ("xbzrle", "rle format=xbzrle")):
        stats = folder / f"{name}.json"
        assert main(["launch", "--mode", "inline", "--stats-json", str(stats),
                     f"workload-src kind=kv size=2MiB seconds=1s rate=40 ! classify ! xor-delta ! {chain} ! frame ! "
                     f"deframe ! decode ! replica-sink path={folder / name} fsync=false"]) == 0
        files.append(stats)
    return files


def test_png_report_of_two_runs(two_runs, tmp_path):
    output = tmp_path / "report.png"
    assert main(["report", *map(str, two_runs), "-o", str(output)]) == 0
    picture = output.read_bytes()
    assert picture.startswith(b"\x89PNG") and len(picture) > 50_000


def test_html_report_embeds_the_picture_and_the_distributions(two_runs, tmp_path):
    output = tmp_path / "report.html"
    assert main(["report", *map(str, two_runs), "-o", str(output)]) == 0
    page = output.read_text()
    assert "data:image/png;base64," in page
    for text in ("native-zstd", "xbzrle", "pause_seconds", "commit_latency_seconds", "ratio"):
        assert text in page


def test_report_of_benchmark_json(tmp_path):
    figures = tmp_path / "stats-bench.json"
    assert main(["bench", "stats", "--epochs", "200", "--repeat", "1", "--json", str(figures)]) == 0
    assert "total_us" in json.loads(figures.read_text())
    output = tmp_path / "bench.png"
    assert main(["report", str(figures), str(figures), "-o", str(output)]) == 0
    assert output.read_bytes().startswith(b"\x89PNG")
