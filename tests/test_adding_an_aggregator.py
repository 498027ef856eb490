"""docs/ARCHITECTURE.md's promise: an aggregator is added with one new file and one registry line.

The new files live outside the package here (registry entries may name ``"module:Class"``), and the
registry line is added by a pytest plugin before Tolaria is imported, exactly as the line in
tolaria/registry.py would be. Nothing else is touched, and the aggregator is then a name of
``build_aggregator`` and ``tolaria train``, a class of the facade, and a member of the property suite,
which holds it to the promises its class declares (a false promise fails it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NEW_FILE = '''
import torch

from tolaria.aggregation import Aggregator, Weights


class Halfway(Aggregator):
    """Half the mean: out = (1 / 2K) sum_k g_k."""

    promises = frozenset({"permutation", "linear"})

    def weighting(self, gram):
        k = gram.shape[0]
        weights = torch.full((k,), 0.5 / k, dtype=gram.dtype, device=gram.device)
        return Weights(weights, torch.zeros((), dtype=torch.int64))


class Opposed(Aggregator):
    """g_0 - g_1 - ... : it promises a non-conflicting result, which it is not."""

    promises = frozenset({"non_conflicting"})

    def weighting(self, gram):
        k = gram.shape[0]
        weights = -torch.ones(k, dtype=gram.dtype, device=gram.device)
        weights[0] = 1.0
        return Weights(weights, torch.zeros((), dtype=torch.int64))
'''

REGISTRY_LINES = """
import tolaria.registry

tolaria.registry.AGGREGATORS["halfway"] = "halfway_weighting:Halfway"
tolaria.registry.AGGREGATORS["opposed"] = "halfway_weighting:Opposed"
"""

CHECKS = """
import halfway_registry  # noqa: F401  (the registry line)
import torch

import tolaria
from tolaria.aggregation import AGGREGATOR_NAMES, build_aggregator, registered_name
from tolaria.cli import main

assert "halfway" in AGGREGATOR_NAMES
agg = build_aggregator("halfway")
assert type(agg) is tolaria.Halfway is tolaria.aggregation.Halfway and registered_name(agg) == "halfway"
j = torch.randn(3, 50, dtype=torch.float64)
assert torch.allclose(agg(j), j.mean(0) / 2, rtol=1e-12, atol=0)
assert main(["train", "--aggregator", "halfway", "--max-steps", "2", "--out", "RUN_DIR", "--no-progress"]) == 0
print("checks passed")
"""


@pytest.mark.slow
def test_a_new_file_and_a_registry_line_make_a_full_aggregator(tmp_path):
    (tmp_path / "halfway_weighting.py").write_text(NEW_FILE)
    (tmp_path / "halfway_registry.py").write_text(REGISTRY_LINES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    checks = textwrap.dedent(CHECKS).replace("RUN_DIR", str(tmp_path / "run"))
    done = subprocess.run([sys.executable, "-c", checks], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "checks passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    suite_file = str(ROOT / "tests/aggregation/test_property_suite.py")
    command = [sys.executable, "-m", "pytest", "-p", "halfway_registry", "-p", "no:cacheprovider", "-q", "-rf"]
    command += [suite_file, "-k", "(halfway or opposed) and not triton"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT).stdout
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    # The false promise is caught, and only it: every Halfway case passes.
    assert failed and all("opposed" in line for line in failed), out[-3000:]
    assert "conflicts with a source" in out, out[-3000:]
    assert not any("halfway" in line for line in failed), out[-3000:]
    passed = int(out.rsplit(" passed", 1)[0].rsplit(" ", 1)[-1])
    assert passed > 50, out[-2000:]
