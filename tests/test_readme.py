"""The README's Python example runs as written (in a subprocess, from a scratch directory)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs_and_writes_its_trace(tmp_path):
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(block for block in blocks if "Pipeline.chain" in block)
    script = tmp_path / "example.py"
    script.write_text(example)
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    trace = tmp_path / "grid.trace"
    assert trace.stat().st_size > 0
    assert "'bytes_in': " in completed.stdout
