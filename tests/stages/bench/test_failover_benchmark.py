"""The failure-detection benchmark, shortened: its report and exit status, never its speed."""
import re

from stages.bench.failover import main


def test_failover_benchmark_reports_the_soak_and_the_detection_time(capsys):
    status = main(["--seconds", "1", "--rounds", "1", "--burn", "0"])
    out = capsys.readouterr().out
    assert status in (0, 1)
    assert "false failovers in 1 s with the primary alive: 0; target 0: met" in out
    assert re.search(r"declared lost by zmq-src [\d.]+ s .* arrived after [\d.]+ s .* target median <= 1.2 s: "
                     r"(met|MISSED)", out)


def test_bad_arguments_exit_with_status_2():
    assert main(["--rounds", "0"]) == 2
