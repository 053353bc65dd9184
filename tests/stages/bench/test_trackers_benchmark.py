"""The tracker pause benchmark on tiny sizes: its report and exit status, never its speed."""
import shutil

import pytest

from stages.bench.trackers import PauseFigures, RedisFigures, main


def test_benchmark_reports_every_tracker_with_its_baseline(capsys):
    status = main(["--sizes", "4,8", "--checkpoints", "2", "--long-checkpoints", "3", "--digest-checkpoints", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert status in (0, 1)
    figures = [line for line in lines if "median pause" in line]
    names = [line.split(":")[0] for line in figures]
    for size in (4, 8):
        assert f"region-src uffd, {size} MiB, 1.0% dirty" in names
        assert f"region-src digest, {size} MiB, 1.0% dirty" in names
        assert any(name.startswith(f"process-src uffd, child of {size} MiB") for name in names)
        assert any(name.startswith(f"process-src digest, child of {size} MiB") for name in names)
    assert any(name.startswith("process-src uffd, child of 4 MiB writing 20 pages") for name in names)
    assert any(line.startswith("pause at the same dirty pages, 8 MiB vs 4 MiB child") for line in lines)
    assert all("x memcpy" in line and "p99" in line for line in figures)
    assert ("MISSED" in "".join(lines)) == (status == 1)
    first = [line for line in lines if "process-src uffd, 8 MiB: first, full checkpoint" in line]
    assert first and "copied live: arming stop" in first[0] and "pages it sent" in first[0], lines


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                    reason="redis-server / redis-benchmark not installed (apt-get install redis-server redis-tools)")
def test_the_redis_scenario_reports_rate_pauses_and_stopped_share(capsys):
    status = main(["--sizes", "4", "--checkpoints", "1", "--long-checkpoints", "1", "--digest-checkpoints", "1",
                   "--redis-seconds", "1", "--redis-keys", "2000"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("redis")]
    assert len(lines) == 3 and "checkpoints/s" in lines[0] and "p99" in lines[1] and "stopped" in lines[2]
    assert status in (0, 1)


def test_bad_arguments_exit_with_status_2():
    assert main(["--dirty", "0"]) == 2
    assert main(["--sizes", "x"]) == 2
    assert main(["--no-such-option"]) == 2


def test_verdict_compares_the_median_and_p99_with_the_targets():
    assert PauseFigures("x", [0.001, 0.002, 0.003], [0.001], target=0.003, target_p99=0.01).line().endswith("met")
    assert PauseFigures("x", [0.004, 0.005, 0.001], [0.001], target=0.003).line().endswith("MISSED")
    assert PauseFigures("x", [0.001] * 50 + [0.05] * 2, [0.001], target=0.003, target_p99=0.01).line().endswith(
        "MISSED")
    assert RedisFigures(1.0, pauses=[0.001] * 40, stopped_fraction=0.04).met
    assert not RedisFigures(1.0, pauses=[0.001] * 20, stopped_fraction=0.04).met
