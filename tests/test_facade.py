"""``from tolaria import ...``: the facade names exactly what the subpackages define."""

import subprocess
import sys

import pytest

import tolaria
import tolaria.aggregation
import tolaria.trainer


@pytest.mark.parametrize("name", [n for n in tolaria.__all__ if n != "__version__"])
def test_every_name_is_the_subpackages_object(name):
    home = tolaria.aggregation if hasattr(tolaria.aggregation, name) else tolaria.trainer
    assert getattr(tolaria, name) is getattr(home, name)


def test_every_aggregator_of_the_registry_is_in_the_facade():
    classes = {tolaria.aggregation.aggregator_class(n).__name__ for n in tolaria.aggregation.AGGREGATOR_NAMES}
    assert classes <= set(tolaria.__all__)


def test_the_import_line_of_the_readme_works_and_unknown_names_fail():
    from tolaria import GradientBuffer, PCGrad, Trainer, TrainerConfig, UPGrad  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        tolaria.Nope  # noqa: B018


def test_import_tolaria_alone_loads_no_subpackage():
    # Only the registry's dict of names (tolaria/registry.py imports nothing), and never torch.
    loaded = "[m for m in sys.modules if m.startswith(('tolaria.', 'torch')) and m != 'tolaria.registry']"
    code = f"import sys, tolaria; print(any({loaded}))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_the_declared_python_range_is_what_the_code_needs():
    # tolaria.trainer reads TOML with tomllib, new in Python 3.11: the declared floor must say so.
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)
