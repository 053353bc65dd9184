"""The layering contract: the runtime imports no stage, benchmark or kernel, statically or by a module name in a
string (importlib, entry points); the kernels import nothing of ours. CI runs these with the rest of the suite."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
FORBIDDEN_IN_RUNTIME = re.compile(r"(stages|benchmarks|cython_kernels)[.:][\w.:]*")
"""A module path (``stages.transport``, ``stages.classify:Classify``, the start ``benchmarks.`` of an f-string);
the bare word ``stages`` (a statistics key) is no module name."""
FORBIDDEN_IN_KERNELS = re.compile(r"^\s*(from|c?import)\s+(pipeline|stages|benchmarks)\b", re.M)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.exists(), "lint-imports missing: pip install -e '.[test]' installs import-linter"
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def module_names_in_strings(source: str) -> list[str]:
    """String constants (f-string parts too) that name a stages/benchmarks/kernels module or ``module:attr``."""
    return [node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and FORBIDDEN_IN_RUNTIME.fullmatch(node.value.strip())]


def test_import_linter_contracts_are_kept():
    completed = lint_imports(REPO)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "0 broken" in completed.stdout and "The runtime imports nothing of the stages" in completed.stdout


def test_import_linter_fails_when_the_runtime_imports_a_stage(tmp_path):
    for package in ("pipeline", "stages", "cython_kernels"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    bus = tmp_path / "pipeline" / "bus.py"
    bus.write_text(bus.read_text() + "\nfrom stages.classify import Classify  # a leak\n")
    completed = lint_imports(tmp_path)
    assert completed.returncode != 0
    assert "pipeline.bus -> stages.classify" in completed.stdout


def test_the_runtime_names_no_stage_or_benchmark_module_in_a_string():
    found = {str(path.relative_to(REPO)): names for path in sorted((REPO / "pipeline").rglob("*.py"))
             if (names := module_names_in_strings(path.read_text()))}
    assert found == {}


def test_the_string_scan_finds_module_names_in_importlib_and_entry_point_strings():
    source = ('import importlib\nimportlib.import_module("stages.transport")\n'
              'TARGET = "stages.classify:Classify"\nBENCH = f"benchmarks.{1}"\n'
              'NOTE = "stages are elements"\nKEY = "stages"\n')
    assert sorted(module_names_in_strings(source)) == ["benchmarks.", "stages.classify:Classify", "stages.transport"]


def test_the_kernels_import_nothing_of_ours():
    sources = sorted((REPO / "cython_kernels").glob("*.p*"))
    assert any(path.suffix == ".pyx" for path in sources)
    leaks = {path.name: FORBIDDEN_IN_KERNELS.findall(path.read_text())
             for path in sources if path.suffix in (".py", ".pyx", ".pxd", ".pyi")}
    assert {name: found for name, found in leaks.items() if found} == {}
