"""The kernels' .pyi stubs stay in step with the compiled modules: mypy's stubtest compares each stub with the
module built from its .pyx (names, parameters, defaults), and catches a stub that drifted."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cython_kernels

KERNELS = Path(cython_kernels.__file__).parent
MODULES = sorted(path.stem for path in KERNELS.glob("*.pyx"))
ALLOWLIST = r"cython_kernels\.\w+\.__test__"  # the doctest table Cython adds to every module


def stubtest(modules: list[str], cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text(ALLOWLIST + "\n")
    return subprocess.run([sys.executable, "-m", "mypy.stubtest", "--allowlist", str(allowlist),
                           *(f"cython_kernels.{name}" for name in modules)],
                          cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_every_compiled_kernel_has_a_stub():
    assert MODULES and [name for name in MODULES if not (KERNELS / f"{name}.pyi").is_file()] == []


def test_stubs_match_the_compiled_modules(tmp_path):
    completed = stubtest(MODULES, KERNELS.parent, tmp_path)
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]


def test_a_stub_that_drifted_is_caught(tmp_path):
    """A copy of the built ``pages`` module beside a stub whose parameter was renamed fails the check."""
    built = next(KERNELS.glob("pages.*.so"), None)
    if built is None:
        pytest.skip("cython_kernels.pages is not built in place (pip install -e .)")
    package = tmp_path / "copy" / "cython_kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(built, package / built.name)
    stub = (KERNELS / "pages.pyi").read_text()
    assert "out: np.ndarray" in stub
    (package / "pages.pyi").write_text(stub.replace("out: np.ndarray", "result: np.ndarray", 1))
    completed = stubtest(["pages"], package.parent, tmp_path)
    assert completed.returncode != 0 and "cython_kernels.pages.find_zero_pages" in completed.stdout, \
        completed.stdout[-3000:]
