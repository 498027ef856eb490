"""``pytest benchmarks/ --benchmark-only`` collects every benchmark module here (their names say what
they measure, not ``test_*``); ``--benchmark-json FILE`` keeps the figures."""

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent):
    # A file named on the command line is collected by pytest itself: collecting it here too would
    # run every benchmark twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name != "conftest.py" and not file_path.name.startswith("_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
