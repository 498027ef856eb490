"""Every code block of README.md runs: Python blocks are executed, TOML blocks load as a config,
and every command line of the shell blocks runs (or, where it needs a GPU or several machines, its
arguments are parsed by the same parser)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def _commands(block: str) -> list[str]:
    """The block's command lines: continuations joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [shlex.join(words) for words in lines if words]


def test_the_readme_has_blocks_of_every_kind():
    assert len(_blocks("python")) >= 5 and _blocks("toml") and len(_blocks("bash")) >= 3


@pytest.mark.parametrize("line,code", _blocks("python"), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    finally:
        import tolaria.aggregation

        tolaria.aggregation.set_cpu_isa(tolaria.aggregation.supported_cpu_isas()[0])


@pytest.mark.parametrize("line,text", _blocks("toml"), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_toml_block_is_a_valid_config(line, text, tmp_path):
    from tolaria.trainer.command import load_config

    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    config, task, given = load_config(str(path))
    assert given  # it set something, and every key was known (an unknown key raises)


def _needs_what_this_machine_lacks(words: list[str]) -> bool:
    """A GPU, or several machines (a torchrun of CPU processes on this one runs)."""
    return "cuda" in words or "--nnodes" in words


def _tolaria_arguments(words: list[str]) -> list[str] | None:
    if words[0] == "tolaria":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "tolaria.cli":
        return words[words.index("-m") + 2 :]
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shell_blocks_run_in_order(tmp_path):
    from tolaria.cli import build_parser

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ran = 0
    for line, block in _blocks("bash"):
        for command in _commands(block):
            for part in command.split(" && "):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    continue  # CI installs exactly these lines before it runs the tests
                if words[:3] == ["python", "-m", "pytest"]:
                    continue  # that is this test suite
                arguments = _tolaria_arguments(words)
                if _needs_what_this_machine_lacks(words):
                    assert arguments is not None, f"README.md:{line}: {part!r} is not a tolaria command"
                    build_parser().parse_args(arguments)  # a GPU or several machines: parse only
                    continue
                result = subprocess.run(
                    words if words[0] != "tolaria" else [sys.executable, "-m", "tolaria.cli", *words[1:]],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                expected = (0, 3) if "--inject-fault" in words else (0,)
                if "kill" in words:
                    expected = (-9, 137)
                assert result.returncode in expected, (
                    f"README.md:{line}: {part!r} exited {result.returncode}\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
                )
                ran += 1
    assert ran >= 5
