"""The type hints hold: mypy, configured by pyproject.toml's [tool.mypy] (pipeline/ and stages/ with
check_untyped_defs), reports no error. Uses the repository's .mypy_cache so reruns are incremental."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_mypy_reports_no_error():
    completed = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"mypy failed:\n{completed.stdout}{completed.stderr}"
    assert "Success: no issues found" in completed.stdout
