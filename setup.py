"""Builds Tolaria's C++ extensions (pybind11) alongside the Python package.

Everything else about the package lives in pyproject.toml.
"""

import json
import platform
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

CSRC = Path("csrc")

# One extension per concept in csrc/: module name -> source folder.
EXTENSIONS = {
    "tolaria._aggregation_cpu": "aggregation",
    "tolaria._signal": "signal",
}


# Flags of single source files, on top of the extension's: each ISA level's kernels are compiled
# for exactly that level (csrc/aggregation/kernels.h explains why they must stay in their own files),
# and chosen at load time. Other architectures compile those files to nothing.
_ISA_FLAGS = json.loads((CSRC / "aggregation" / "isa_flags.json").read_text())
PER_FILE_FLAGS: dict[str, list[str]] = _ISA_FLAGS["x86_64"] if platform.machine().lower() in {"x86_64", "amd64"} else {}


def _extension(module: str, folder: str) -> Pybind11Extension:
    sources = sorted(str(p) for p in (CSRC / folder).glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"no C++ sources for {module} in {CSRC / folder}")
    return Pybind11Extension(
        module,
        sources,
        # Headers too: a change to kernels.h must rebuild the ISA files that include it.
        depends=sorted(str(p) for p in (CSRC / folder).glob("*.h")),
        cxx_std=17,
        extra_compile_args=["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi"],
        libraries=["dl"],
    )


class BuildExt(build_ext):
    """pybind11's build_ext, plus PER_FILE_FLAGS for the sources that need their own."""

    def build_extension(self, ext):
        compile_one = self.compiler._compile

        def compile_with_file_flags(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            extra = PER_FILE_FLAGS.get(Path(src).name, [])
            compile_one(obj, src, ext_, cc_args, list(extra_postargs) + extra, pp_opts)

        self.compiler._compile = compile_with_file_flags
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = compile_one


setup(
    # `kernels/` ships inside the tolaria namespace as `tolaria.kernels`, never as a top-level
    # `kernels` in site-packages.
    packages=find_packages(include=["tolaria", "tolaria.*"]) + ["tolaria.kernels"],
    package_dir={"tolaria.kernels": "kernels"},
    ext_modules=[_extension(m, f) for m, f in EXTENSIONS.items()],
    cmdclass={"build_ext": BuildExt},
)
