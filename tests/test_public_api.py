"""Every module of Tolaria (``tolaria/`` and ``kernels/``, installed as ``tolaria.kernels``) says
what it exports: an explicit ``__all__`` whose every name exists in the module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[tuple[str, Path]]:
    found = []
    for base, package in ((ROOT / "tolaria", "tolaria"), (ROOT / "kernels", "tolaria.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join([package, *parts]), path))
    return found


MODULES = _modules()


def _assigns_all(path: Path) -> bool:
    """Whether the module assigns ``__all__`` at its top level (it may build the list, as ``tolaria``'s does)."""
    for node in ast.parse(path.read_text()).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


@pytest.mark.parametrize("name,path", MODULES, ids=[name for name, _ in MODULES])
def test_module_defines_all_and_every_name_exists(name, path):
    assert _assigns_all(path), f"{path.relative_to(ROOT)} defines no top-level __all__"
    if name.startswith("tolaria.kernels.") and name != "tolaria.kernels":
        pytest.importorskip("triton")
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert all(isinstance(n, str) for n in exported) and len(set(exported)) == len(exported), name
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"
