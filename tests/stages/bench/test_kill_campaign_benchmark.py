"""The kill campaign on one run: its report and exit status."""
from stages.bench.kill_campaign import Outcome, main


def test_one_run_reports_the_kill_and_the_count(capsys):
    status = main(["--runs", "1", "--seed", "3", "--target-size", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run   1: SIG") and " to " in lines[0]
    assert lines[-2].startswith("kill campaign: 1 runs, 0 targets left stopped, 0 targets died")
    assert lines[-1] == "target: 0 targets left stopped over 1 runs: met" and status == 0


def test_bad_arguments_exit_with_status_2():
    assert main(["--runs", "0"]) == 2
    assert main(["--no-such-option"]) == 2


def test_a_run_line_says_what_was_left():
    assert "(running): LEFT STOPPED" in Outcome("a worker", "SIGKILL", 0.5, True, False, phase="running").line()
    assert Outcome("the launcher", "SIGTERM", 0.1, False, False, [12, 13]).line().endswith(
        "target runs, 2 pagepipe processes left behind")
