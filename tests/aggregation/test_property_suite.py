"""Every aggregator against the properties it promises, over every input family (TorchJD's style:
assertions in property_assertions.py, inputs in input_families.py), in float32 and float64, on the
compiled CPU backend, the plain-PyTorch backend and the Triton kernels (interpreted on CPU).
"""

from __future__ import annotations

import pytest
import torch

from tolaria.aggregation import AGGREGATOR_NAMES, MGDA, DualProj, aggregator_class

from . import property_assertions as props
from .input_families import FAMILIES, all_cases
from .registry_examples import example_aggregator

# Every registered aggregator, with what its class promises (``Aggregator.promises``: beyond finite
# output of the right shape, which all give): an aggregator added to tolaria/registry.py is covered.
PROMISES: dict[str, frozenset[str]] = {name: aggregator_class(name).promises for name in AGGREGATOR_NAMES}
DTYPES = [torch.float64, torch.float32]
BACKENDS = ["cpu", "torch", "triton"]


def _aggregator(name: str, backend: str, k: int):
    kwargs = {"shuffle": False} if name == "pcgrad" else {"c": 0.5} if name == "cagrad" else {}
    aggregator = example_aggregator(name, k, backend=backend, **kwargs)
    if not aggregator.stateful or aggregator.takes_generator():
        return aggregator

    def from_a_fresh_state(matrix):
        aggregator.reset()
        return aggregator(matrix)

    return from_a_fresh_state


def _param(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])


# Every aggregator over every case, but Krum, which needs three sources (see test_krum.py).
_PAIRS = [(name, case) for case in all_cases() for name in PROMISES if name != "krum" or case.matrix.shape[0] >= 3]


# Every pair on the two CPU backends in both dtypes. Under the Triton interpreter (a thousand times
# slower than the compiled path) the cases up to K = 12 sources, float64 up to K = 9: the kernels
# themselves are tested at K up to 64 in tests/kernels, and the weightings run the same torch code
# on every backend, so the larger cases add time, not coverage.
_RUNS = [
    (name, case, backend, dtype)
    for name, case in _PAIRS
    for backend in BACKENDS
    for dtype in DTYPES
    if backend != "triton" or case.matrix.shape[0] <= (9 if dtype == torch.float64 else 12)
]


@pytest.mark.parametrize("name,case,backend,dtype", _RUNS, ids=[f"{b}-{c.name}-{n}-{str(d)}" for n, c, b, d in _RUNS])
def test_structure_and_promised_properties(name, case, backend, dtype):
    matrix = case.matrix.to(dtype)
    aggregate = _aggregator(name, backend, matrix.shape[0])
    promises = PROMISES[name]
    props.assert_expected_structure(aggregate, matrix)
    family = next(f for f, cases in FAMILIES.items() if case in cases)
    solvable = family == "not_weakly_stationary"
    if "non_conflicting" in promises or ("solvable:non_conflicting" in promises and solvable):
        props.assert_non_conflicting(aggregate, matrix)
    if "permutation" in promises or ("solvable:permutation" in promises and solvable):
        props.assert_permutation_invariant(aggregate, matrix)
    if "linear" in promises and family not in ("scaled",):
        props.assert_linear_under_scaling(aggregate, matrix)
    if "zero_if_stationary" in promises and family == "strongly_stationary":
        props.assert_zero(aggregate, matrix)
    if "strongly_stationary" in promises and family in ("weakly_not_strongly_stationary", "not_weakly_stationary"):
        props.assert_nonzero_unless_strongly_stationary(aggregate, matrix)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@_param(all_cases())
def test_dualproj_solves_its_qp(dtype, case):
    matrix = case.matrix.to(dtype)
    _, stats = DualProj()(matrix, return_stats=True)
    k = matrix.shape[0]
    props.assert_dual_cone_kkt(stats.weights, stats.gram, torch.full((k,), 1.0 / k, dtype=torch.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@_param([c for c in all_cases() if c.matrix.abs().max() > 0])
def test_mgda_solves_its_qp(dtype, case):
    _, stats = MGDA()(case.matrix.to(dtype), return_stats=True)
    props.assert_min_norm_kkt(stats.weights, stats.gram, dtype)
