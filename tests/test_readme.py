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


def test_readme_writing_a_stage_runs_as_written(tmp_path):
    """The stage of "Writing a stage", registered in-process, used in a launch line (process mode) and tested
    with the harness, exactly as the README shows it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Writing a stage", 1)[1].split("\n### ", 1)[0]
    stage_block, harness_block = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len([line for line in stage_block.split("\n\nif __name__")[0].splitlines() if line.strip()]) < 40
    script = tmp_path / "my_stage.py"
    script.write_text(stage_block + "\n" + harness_block + "\nprint('harness ok')\n")
    completed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    counted = re.search(r"\{'raw': (\d+)\}", completed.stdout)
    assert counted and int(counted.group(1)) > 0 and "harness ok" in completed.stdout
