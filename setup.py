"""Build the Cython kernels.

PAGEPIPE_DEBUG=1 builds them with bounds and wraparound checks on, for hunting
kernel bugs; the default build relies on the kernels' explicit length checks.
"""
import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PAGEPIPE_DEBUG") == "1"

extensions = [
    Extension(
        f"cython_kernels.{pyx.stem}",
        [str(pyx)],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    )
    for pyx in sorted(Path("cython_kernels").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": True,
        },
    ),
)
