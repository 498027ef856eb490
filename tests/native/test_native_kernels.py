"""The compiled CPU kernels outside Python: built by every compiler and for every architecture we
claim, run against a double reference (tests/native/kernel_harness.cpp), and inspected for the one
property that makes them fast: no vector kept on the stack in a hot loop.

aarch64 is cross-compiled (Debian's g++-aarch64-linux-gnu, and clang) and run under qemu-user; CI
installs those tools, elsewhere the tests skip where one is missing. Emulated timings mean nothing:
none are taken.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc" / "aggregation"
HARNESS = Path(__file__).with_name("kernel_harness.cpp")
KERNEL_SOURCES = ["dispatch.cpp", "isa_avx512.cpp", "isa_avx2.cpp", "isa_baseline.cpp", "isa_neon.cpp"]
X86_FLAGS: dict[str, list[str]] = json.loads((CSRC / "isa_flags.json").read_text())["x86_64"]
COMMON = ["-std=c++17", "-O2", "-ffp-contract=fast", "-Wall", "-Werror", f"-I{CSRC}"]
ON_X86 = platform.machine().lower() in {"x86_64", "amd64"}

pytestmark = pytest.mark.slow


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (CI installs them: see .ci/run)")


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def _compile_objects(cxx: list[str], out: Path, x86_flags: bool) -> list[Path]:
    objects = []
    for name in [*KERNEL_SOURCES, "kernel_harness.cpp"]:
        source = HARNESS if name == "kernel_harness.cpp" else CSRC / name
        extra = X86_FLAGS.get(name, []) if x86_flags else []
        obj = out / f"{name}.o"
        _run([*cxx, *COMMON, *extra, "-c", str(source), "-o", str(obj)])
        objects.append(obj)
    return objects


def _assert_harness_passed(output: str, levels: set[str]) -> None:
    match = re.search(r"levels (\S+): (\d+) checks, 0 failures", output)
    assert match, output
    assert set(match.group(1).split(",")) == levels
    assert int(match.group(2)) > 100_000


@pytest.mark.skipif(not ON_X86, reason="the x86-64 levels")
def test_every_x86_level_of_this_cpu_against_double(tmp_path):
    _need("g++")
    from tolaria.aggregation import supported_cpu_isas

    objects = _compile_objects(["g++"], tmp_path, x86_flags=True)
    _run(["g++", *map(str, objects), "-o", str(tmp_path / "harness")])
    _assert_harness_passed(_run([str(tmp_path / "harness")]).stdout, set(supported_cpu_isas()))


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_aarch64_neon_and_baseline_under_qemu(tmp_path, compiler):
    if compiler == "gcc":
        _need("aarch64-linux-gnu-g++", "qemu-aarch64")
        cxx = ["aarch64-linux-gnu-g++"]
    else:
        _need("clang++", "aarch64-linux-gnu-g++", "qemu-aarch64")  # clang links with the GNU cross tools
        cxx = ["clang++", "--target=aarch64-linux-gnu"]
    objects = _compile_objects(cxx, tmp_path, x86_flags=False)
    _run([*cxx, "-static", *map(str, objects), "-o", str(tmp_path / "harness")])
    output = _run(["qemu-aarch64", str(tmp_path / "harness")]).stdout
    _assert_harness_passed(output, {"neon", "baseline"})


@pytest.mark.parametrize(
    "cxx",
    [["clang++"], ["aarch64-linux-gnu-g++"], ["clang++", "--target=aarch64-linux-gnu"]],
    ids=["clang-native", "gcc-aarch64", "clang-aarch64"],
)
def test_bindings_compile(cxx, tmp_path):
    # The pybind11 module itself (its Python headers are this machine's; only syntax and semantics
    # are checked for another architecture, which is all the binding code can get wrong there).
    _need(cxx[0])
    import pybind11

    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    for name in ["module.cpp", "parallel.cpp"]:
        _run([*cxx, *COMMON, *includes, "-fsyntax-only", str(CSRC / name)])
    if cxx == ["clang++"] and ON_X86:
        _compile_objects(cxx, tmp_path, x86_flags=True)  # every x86 level through clang


@pytest.mark.skipif(not ON_X86, reason="reads x86-64 disassembly")
def test_hot_loops_keep_vectors_in_registers():
    # The innermost loops that do the arithmetic (4+ multiplies or FMAs) of every level's kernels in
    # the installed extension address no vector on the stack: each level's vectors are its CPU's own
    # registers. (A 16-float vector compiled for AVX2 was kept in memory: 368 instructions and 190
    # stack accesses per 16 columns, 4x slower.)
    _need("objdump")
    from tolaria import _aggregation_cpu

    text = _run(["objdump", "-d", "--no-show-raw-insn", "-C", _aggregation_cpu.__file__]).stdout
    loops = _innermost_arithmetic_loops(text)
    levels = {level for level, _ in loops}
    assert {"Avx512", "Avx2", "Baseline"} <= levels, f"kernels not found in the disassembly: {levels}"
    spilled = [(level, body) for level, body in loops if any(_stack_vector(line) for line in body)]
    assert not spilled, "\n\n".join(f"{level}:\n" + "\n".join(body) for level, body in spilled[:3])


def _stack_vector(instruction: str) -> bool:
    return bool(re.search(r"[xyz]mm", instruction) and "(%rsp" in instruction)


def _innermost_arithmetic_loops(disassembly: str) -> list[tuple[str, list[str]]]:
    loops = []
    for function in re.split(r"\n(?=[0-9a-f]+ <)", disassembly):
        header = re.match(r"[0-9a-f]+ <.*Kernels<\(anonymous namespace\)::(\w+)>::(gram|combine)", function)
        if not header:
            continue
        code = [
            (int(m.group(1), 16), m.group(2)) for m in re.finditer(r"^\s+([0-9a-f]+):\s+(.*)$", function, re.MULTILINE)
        ]
        backward = []
        for address, text in code:
            jump = re.match(r"j\w+\s+([0-9a-f]+) <", text)
            if jump and int(jump.group(1), 16) <= address:
                backward.append((int(jump.group(1), 16), address))
        for start, end in backward:
            if any(start < s and e < end or start <= s and e < end for s, e in backward if (s, e) != (start, end)):
                continue  # an outer loop
            body = [text for address, text in code if start <= address <= end]
            if sum(1 for t in body if re.match(r"v?(fmadd|mulps)", t.split()[0] if t.split() else "")) >= 4:
                loops.append((header.group(1), body))
    return loops
