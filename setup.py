"""Builds Tolaria's C++ extensions (pybind11) alongside the Python package.

Everything else about the package lives in pyproject.toml.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

CSRC = Path("csrc")

# One extension per concept in csrc/: module name -> source folder.
EXTENSIONS = {
    "tolaria._aggregation_cpu": "aggregation",
    "tolaria._signal": "signal",
}


def _extension(module: str, folder: str) -> Pybind11Extension:
    sources = sorted(str(p) for p in (CSRC / folder).glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no C++ sources for {module} in {CSRC / folder}")
    return Pybind11Extension(
        module,
        sources,
        cxx_std=17,
        extra_compile_args=["-O3", "-fno-math-errno", "-Wno-psabi"],
    )


setup(
    # `kernels/` ships inside the tolaria namespace as `tolaria.kernels`, never as a top-level
    # `kernels` in site-packages.
    packages=find_packages(include=["tolaria", "tolaria.*"]) + ["tolaria.kernels"],
    package_dir={"tolaria.kernels": "kernels"},
    ext_modules=[_extension(m, f) for m, f in EXTENSIONS.items()],
    cmdclass={"build_ext": build_ext},
)
