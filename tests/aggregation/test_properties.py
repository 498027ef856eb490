"""Properties every PCGrad result must have, over many generated inputs (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tolaria.aggregation import PCGrad, Sum

from .reference import ascending_orders, pcgrad_reference

matrices = st.builds(
    lambda k, n, seed: torch.randn((k, n), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
    st.integers(1, 9),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
)

SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(matrices, st.sampled_from(["cpu", "torch"]))
def test_non_conflicting_inputs_give_the_plain_sum(j, backend):
    # Make every pair agree: put all rows in one orthant (all entries positive).
    j = j.abs() + 0.01
    out, stats = PCGrad(backend=backend)(j, return_stats=True)
    torch.testing.assert_close(out, Sum(backend="torch")(j))
    assert int(stats.conflicts) == 0


@SETTINGS
@given(st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_two_rows_give_the_same_result_in_either_order(n, seed):
    j = torch.randn((2, n), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    a = PCGrad(shuffle=False)(j)
    b = PCGrad(shuffle=False)(j.flip(0))
    torch.testing.assert_close(a, b)


@SETTINGS
@given(matrices)
def test_result_lies_in_the_span_of_the_inputs(j):
    out = PCGrad()(j)
    # Least-squares fit of out by the rows of J leaves no residual.
    coeffs = torch.linalg.lstsq(j.T, out[:, None]).solution
    residual = (j.T @ coeffs).squeeze(1) - out
    assert residual.abs().max() <= 1e-8 * max(1.0, float(out.abs().max()))


@SETTINGS
@given(matrices, st.integers(0, 2**31 - 1))
def test_seeded_shuffles_are_reproducible(j, seed):
    a = PCGrad(generator=torch.Generator().manual_seed(seed))(j)
    b = PCGrad(generator=torch.Generator().manual_seed(seed))(j)
    assert torch.equal(a, b)


@SETTINGS
@given(matrices)
def test_ascending_order_matches_the_literal_loop(j):
    torch.testing.assert_close(PCGrad(shuffle=False)(j), pcgrad_reference(j, ascending_orders(j.shape[0])))
