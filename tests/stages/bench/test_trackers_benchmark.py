"""The tracker pause benchmark on tiny sizes: its report and exit status, never its speed."""
from stages.bench.trackers import PauseFigures, main


def test_benchmark_reports_every_tracker_with_its_baseline(capsys):
    status = main(["--region-size", "4", "--process-size", "4", "--checkpoints", "2", "--digest-checkpoints", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert status in (0, 1)
    figures = [line for line in lines if "median pause" in line]
    assert [line.split(":")[0] for line in figures] == [
        "region-src uffd, 4 MiB, 1.0% dirty", "region-src digest, 4 MiB, 1.0% dirty", figures[2].split(":")[0]]
    assert figures[2].startswith("process-src, child of 4 MiB")
    assert all("x memcpy" in line for line in figures)
    assert ("MISSED" in "".join(figures)) == (status == 1)


def test_bad_arguments_exit_with_status_2():
    assert main(["--dirty", "0"]) == 2
    assert main(["--no-such-option"]) == 2


def test_verdict_compares_the_median_with_the_target():
    assert PauseFigures("x", [0.001, 0.002, 0.010], [0.001], target=0.003).line().endswith("met")
    assert PauseFigures("x", [0.004, 0.005, 0.001], [0.001], target=0.003).line().endswith("MISSED")
