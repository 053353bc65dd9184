"""The resume and output-commit benchmarks on tiny sizes: their reports and exit status, never their speed."""
import re

from stages.bench import outputcommit, resume


def test_resume_benchmark_reports_resume_beside_fromfile(capsys, tmp_path):
    status = resume.main(["--size", "8MiB", "--repeat", "1", "--directory", str(tmp_path)])
    out = capsys.readouterr().out
    assert status in (0, 1)
    assert re.search(r"np.fromfile of the image \(fresh process\): [\d.]+ s", out)
    assert re.search(r"resume, verified and tracked \(fresh process\): [\d.]+ s .* target <= 0.02 s: (met|MISSED)",
                     out)
    assert re.search(r"resume / fromfile: [\d.]+ x; target <= 1.5 x: (met|MISSED)", out)
    assert ("MISSED" in out) == (status == 1)
    assert list(tmp_path.iterdir()) == []   # its replica is gone


def test_output_commit_benchmark_reports_fsync_and_settle_settings(capsys):
    status = outputcommit.main(["--size", "1MiB", "--seconds", "0.3", "--rate", "40", "--mode", "inline"])
    lines = capsys.readouterr().out.splitlines()
    assert status in (0, 1)
    assert [line.split()[:2] for line in lines[:3]] == [
        ["fsync=true", "settle=idle"], ["fsync=true", "settle=commit"], ["fsync=false", "settle=idle"]]
    assert all(re.search(r"produced -> released median [\d.]+ ms, p90 [\d.]+ ms over \d+ checkpoints", line)
               for line in lines[:3])
    assert ("MISSED" in lines[0]) == (status == 1)


def test_benchmarks_refuse_bad_arguments():
    assert resume.main(["--size", "0"]) == 2
    assert outputcommit.main(["--dirty", "2"]) == 2
